"""API keys: random tokens shown once; only a keyed SHA-256 hash is stored."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from functools import lru_cache
from pathlib import Path

from app.config import Settings

KEY_PREFIX = "cmp_"
PREFIX_LENGTH = 12
PEPPER_FILE = "api_key_pepper"


def generate_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_prefix(key: str) -> str:
    """The part of a key that is stored in clear and shown by `compaas admin list-keys`."""
    return key[:PREFIX_LENGTH]


def hash_api_key(key: str, pepper: str) -> str:
    return hmac.new(pepper.encode(), key.encode(), hashlib.sha256).hexdigest()


def api_key_pepper(settings: Settings) -> str:
    """COMPAAS_API_KEY_PEPPER, or in embedded mode the random pepper kept in the data dir."""
    if settings.api_key_pepper:
        return settings.api_key_pepper
    return data_dir_pepper(settings.data_dir.resolve())


@lru_cache(maxsize=8)
def data_dir_pepper(data_dir: Path) -> str:
    """Read DATA_DIR/api_key_pepper, creating it (random, mode 0600) the first time."""
    path = data_dir / PEPPER_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = data_dir / f".{PEPPER_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)  # atomic and never replaces: a concurrent first start keeps one
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    pepper = path.read_text().strip()
    if len(pepper) < 32:
        raise RuntimeError(
            f"{path} holds no usable pepper; restore it from a backup (keys made with it stop "
            "working without it) or delete it and create new keys"
        )
    return pepper
