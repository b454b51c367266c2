"""Authentication: an API key becomes its team, or a domain error that says why not."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import ApiKey, Team
from app.db.repositories import TeamAdminRepository
from app.security import KEY_PREFIX, hash_api_key

# last_used_at is written at most this often per key, so polling does not write on every request
LAST_USED_RESOLUTION = timedelta(minutes=1)


class AuthError(Exception):
    """The key does not authenticate."""


class InvalidApiKey(AuthError):
    """No such key, or it was revoked (the two are not told apart)."""


class ExpiredApiKey(AuthError):
    """A real key past its expiry."""

    def __init__(self, prefix: str, expired_at: datetime) -> None:
        super().__init__(f"API key {prefix}… expired at {expired_at.isoformat()}")
        self.prefix = prefix
        self.expired_at = expired_at


def as_utc(value: datetime) -> datetime:
    """SQLite hands timestamps back without a zone; they were written in UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def key_status(api_key: ApiKey, now: datetime) -> Literal["active", "expired", "revoked"]:
    """What a key is worth at `now`; revocation wins over expiry."""
    if api_key.revoked_at is not None:
        return "revoked"
    if api_key.expires_at is not None and as_utc(api_key.expires_at) <= now:
        return "expired"
    return "active"


def authenticate(session: Session, key: str, pepper: str, now: datetime | None = None) -> Team:
    """The team that owns `key`; records when the key was last used (throttled)."""
    if not key.startswith(KEY_PREFIX):
        raise InvalidApiKey("not a compaas API key")
    repo = TeamAdminRepository(session)
    found = repo.key_for_hash(hash_api_key(key, pepper))
    if found is None:
        raise InvalidApiKey("unknown API key")
    api_key, team = found
    now = now or utcnow()
    status = key_status(api_key, now)
    if status == "revoked":
        raise InvalidApiKey("revoked API key")
    if status == "expired" and api_key.expires_at is not None:
        raise ExpiredApiKey(api_key.prefix, as_utc(api_key.expires_at))
    not_since = now - LAST_USED_RESOLUTION
    if (
        api_key.last_used_at is None or as_utc(api_key.last_used_at) < not_since
    ) and repo.touch_key(api_key.id, now, not_since):
        session.commit()
    return team
