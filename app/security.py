"""API keys: random tokens shown once; only a keyed SHA-256 hash is stored."""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_PREFIX = "cmp_"


def generate_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str, pepper: str) -> str:
    return hmac.new(pepper.encode(), key.encode(), hashlib.sha256).hexdigest()
