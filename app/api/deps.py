"""Annotated dependencies so routes read like sentences."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.problems import Problem
from app.config import Settings
from app.db.models import Team
from app.db.session import get_sessionmaker
from app.security import api_key_pepper
from app.services import ui_sessions
from app.services.auth import ExpiredApiKey, InvalidApiKey, authenticate
from app.storage import BlobStore


# Dependencies that do no I/O are coroutines: a plain `def` would cost each request a hop to
# the thread pool and back (most routes use these).
async def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(_settings)]


@contextmanager
def open_session(settings: Settings) -> Iterator[Session]:
    """A session closed on exit; routes that stream a body open it after the body arrived."""
    session = get_sessionmaker(settings.database_url)()
    try:
        yield session
    finally:
        session.close()


async def _session(settings: SettingsDep) -> AsyncIterator[Session]:
    """The request's session: made here (no I/O; it takes a connection at its first query, in
    the route's thread) and closed in the thread pool (returning the connection is a rollback)."""
    session = get_sessionmaker(settings.database_url)()
    try:
        yield session
    finally:
        await run_in_threadpool(session.close)


SessionDep = Annotated[Session, Depends(_session)]


async def _storage(request: Request) -> BlobStore:
    storage: BlobStore = request.app.state.storage
    return storage


StorageDep = Annotated[BlobStore, Depends(_storage)]

_UNAUTHORIZED = {"WWW-Authenticate": 'Bearer realm="compaas"'}
# Names the scheme in /openapi.json (Swagger's Authorize button); the route raises the 401.
api_key_bearer = HTTPBearer(
    scheme_name="ApiKey",
    bearerFormat="API key",
    description="Your team's API key (`compaas admin create-team NAME` prints the first one).",
    auto_error=False,
)

# --- dashboard session cookie (issue #16, app/ui) -------------------------------------------
# The browser's own requests to /v1 carry no Authorization header: its EventSource, the report
# link and the download buttons. Only these safe GETs accept the dashboard's session cookie;
# every other /v1 route, and every state-changing one, still needs the API key, so a cookie
# can never change anything without the dashboard's CSRF-checked forms.
COOKIE_ROUTES = frozenset(
    {
        "/v1/jobs/{job_id}/events",
        "/v1/jobs/{job_id}/report",
        "/v1/artifacts/{artifact_id}/download",
    }
)


def cookie_team(request: Request, settings: Settings) -> Team | None:
    """The team of the request's dashboard session, on a COOKIE_ROUTES GET; else None."""
    if request.method not in ("GET", "HEAD"):
        return None
    route = request.scope.get("route")
    if getattr(route, "path", None) not in COOKIE_ROUTES:
        return None
    secure = request.url.scheme == "https"
    token = request.cookies.get(ui_sessions.cookie_name(secure), "")
    if not token:
        return None
    with open_session(settings) as session:
        signed_in = ui_sessions.resolve(session, token, api_key_pepper(settings))
    return signed_in.team if signed_in is not None else None


# --- end dashboard session cookie --------------------------------------------------------


def _current_team(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(api_key_bearer)],
) -> Team:
    """The key's team, looked up in a short session of its own (never held during a body)."""
    if (
        not request.headers.get("authorization")
        and (
            team := cookie_team(request, settings)  # dashboard (#16)
        )
        is not None
    ):
        return team
    key = credentials.credentials if credentials is not None else ""
    if not key.strip():
        raise Problem(
            401,
            "unauthorized",
            "Send your API key as `Authorization: Bearer <key>`. "
            "Create one with `compaas admin create-team NAME`.",
            headers=_UNAUTHORIZED,
        )
    try:
        with open_session(settings) as session:
            return authenticate(session, key.strip(), api_key_pepper(settings))
    except ExpiredApiKey as exc:
        raise Problem(
            401,
            "api_key_expired",
            f"The API key {exc.prefix}… expired at {exc.expired_at.isoformat()}. Ask an operator "
            "for a new one (`compaas admin create-key TEAM`) and send that instead.",
            headers=_UNAUTHORIZED,
        ) from None
    except InvalidApiKey:
        raise Problem(
            401,
            "invalid_api_key",
            "The API key is not valid or was revoked. Check that you sent the whole key; "
            "an operator can list keys with `compaas admin list-keys` and create one with "
            "`compaas admin create-key TEAM`.",
            headers=_UNAUTHORIZED,
        ) from None


CurrentTeam = Annotated[Team, Depends(_current_team)]


class PageParams:
    """?limit=&cursor= for cursor pagination."""

    def __init__(
        self,
        limit: Annotated[int, Query(ge=1, le=100, description="Items per page")] = 20,
        cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    ) -> None:
        self.limit = limit
        self.cursor = cursor


PageDep = Annotated[PageParams, Depends()]
