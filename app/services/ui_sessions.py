"""Dashboard sign-ins (issue #16): an API key is exchanged once for a random session token that
the browser keeps in an HttpOnly cookie. Only a keyed hash of the token is stored (as API keys
are, with the deployment's pepper), so a database dump signs nobody in. The CSRF token of a
session is derived from it (HMAC with the pepper under another label): a synchronizer token that
needs no storage, differs from the cookie, and cannot be computed without the pepper.

No web types here: app/ui sets the cookie and reads the form, app/api/deps reads the cookie on
the few safe /v1 GETs a browser needs (the event stream, the report, artifact downloads)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import ApiKey, Team, UiSession
from app.db.repositories import TeamAdminRepository
from app.security import hash_api_key
from app.services.auth import as_utc, authenticate, key_status

SESSION_LIFETIME = timedelta(hours=12)
COOKIE_NAME = "compaas_session"
# over https the cookie is `__Host-` prefixed: Secure, path /, no Domain, so no sibling
# subdomain can set or shadow it
SECURE_COOKIE_NAME = "__Host-compaas_session"


def cookie_name(secure: bool) -> str:
    return SECURE_COOKIE_NAME if secure else COOKIE_NAME


def _mac(label: str, token: str, pepper: str) -> str:
    return hmac.new(pepper.encode(), f"{label}:{token}".encode(), hashlib.sha256).hexdigest()


def token_hash(token: str, pepper: str) -> str:
    """What is stored for a session token."""
    return _mac("ui-session", token, pepper)


def csrf_token(token: str, pepper: str) -> str:
    """The session's CSRF token, put in every form it renders."""
    return _mac("ui-csrf", token, pepper)


def csrf_ok(token: str, pepper: str, sent: str | None) -> bool:
    """Whether `sent` (a form field or header) is this session's CSRF token (constant time)."""
    return bool(sent) and hmac.compare_digest(csrf_token(token, pepper), sent or "")


@dataclass(frozen=True)
class SignedIn:
    """A session the browser holds: its team and when it ends."""

    team: Team
    session_id: str
    expires_at: datetime


def sign_in(
    session: Session, key: str, pepper: str, now: datetime | None = None
) -> tuple[str, SignedIn]:
    """Exchange an API key for a new session token (raises the key's AuthError when it does not
    authenticate). The token is returned once; the row keeps its hash."""
    now = now or utcnow()
    team = authenticate(session, key, pepper, now)
    found = TeamAdminRepository(session).key_for_hash(hash_api_key(key, pepper))
    assert found is not None  # authenticate just found it
    api_key = found[0]
    expires_at = now + SESSION_LIFETIME
    if api_key.expires_at is not None:
        expires_at = min(expires_at, as_utc(api_key.expires_at))
    token = secrets.token_urlsafe(32)
    row = UiSession(
        team_id=team.id,
        api_key_id=api_key.id,
        token_hash=token_hash(token, pepper),
        created_at=now,
        expires_at=expires_at,
    )
    session.add(row)
    # expired sessions of this team go as new ones come (no sweeper needed)
    session.execute(
        delete(UiSession).where(UiSession.team_id == team.id, UiSession.expires_at < now)
    )
    session.commit()
    return token, SignedIn(team, row.id, expires_at)


def resolve(
    session: Session, token: str, pepper: str, now: datetime | None = None
) -> SignedIn | None:
    """The live session of `token`: not expired, its API key neither revoked nor expired."""
    if not token:
        return None
    now = now or utcnow()
    stmt = (
        select(UiSession, ApiKey, Team)
        .join(ApiKey, UiSession.api_key_id == ApiKey.id)
        .join(Team, UiSession.team_id == Team.id)
        .where(UiSession.token_hash == token_hash(token, pepper))
    )
    row = session.execute(stmt).first()
    if row is None:
        return None
    ui, api_key, team = row
    if as_utc(ui.expires_at) <= now or key_status(api_key, now) != "active":
        return None
    return SignedIn(team, ui.id, as_utc(ui.expires_at))


def sign_out(session: Session, token: str, pepper: str) -> None:
    """End the session of `token` (no error when there is none)."""
    session.execute(delete(UiSession).where(UiSession.token_hash == token_hash(token, pepper)))
    session.commit()
