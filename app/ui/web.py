"""What every dashboard page needs: the signed-in session from the cookie, the CSRF check, the
cookie's flags, the page's Content-Security-Policy and rendering a template."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import ChoiceLoader, Environment, PackageLoader, StrictUndefined, select_autoescape

from app.api.deps import open_session
from app.config import Settings
from app.db.models import Team
from app.report.view import STEP_COLUMNS
from app.security import api_key_pepper
from app.services import ui_sessions

# Scripts and styles only from the app itself; no inline script, no inline style, nothing from
# another host; forms post only back to the app; no framing.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
LOGIN_CSRF_COOKIE = "compaas_login_csrf"


class SignInRequired(Exception):
    """The page needs a signed-in session; answered with a redirect to /ui/login."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


class CsrfRejected(Exception):
    """A state-changing form came without this session's CSRF token."""


@dataclass(frozen=True)
class Viewer:
    """The signed-in browser: its team, its session token and that session's CSRF token."""

    team: Team
    token: str
    csrf: str


def is_secure(request: Request) -> bool:
    return request.url.scheme == "https"


def session_token(request: Request) -> str:
    return request.cookies.get(ui_sessions.cookie_name(is_secure(request)), "")


def viewer_or_none(request: Request) -> Viewer | None:
    settings: Settings = request.app.state.settings
    token = session_token(request)
    if not token:
        return None
    pepper = api_key_pepper(settings)
    with open_session(settings) as session:
        signed_in = ui_sessions.resolve(session, token, pepper)
    if signed_in is None:
        return None
    return Viewer(signed_in.team, token, ui_sessions.csrf_token(token, pepper))


def viewer(request: Request) -> Viewer:
    """The page's viewer, or a redirect to the sign-in page (coming back here after)."""
    found = viewer_or_none(request)
    if found is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise SignInRequired(target)
    return found


def check_csrf(request: Request, who: Viewer, sent: str | None) -> None:
    """Refuse a state-changing request whose form field (or X-CSRF-Token header) is not the
    session's CSRF token."""
    settings: Settings = request.app.state.settings
    sent = sent or request.headers.get("x-csrf-token")
    if not ui_sessions.csrf_ok(who.token, api_key_pepper(settings), sent):
        raise CsrfRejected()


def set_session_cookie(response: Any, request: Request, token: str, max_age: int) -> None:
    """HttpOnly (no script reads it), SameSite=Strict (no other site's page sends it), Secure
    and `__Host-` prefixed over https, path / (the /v1 event stream and downloads need it)."""
    secure = is_secure(request)
    response.set_cookie(
        ui_sessions.cookie_name(secure),
        token,
        max_age=max_age,
        path="/",
        secure=secure,
        httponly=True,
        samesite="strict",
    )


def clear_session_cookie(response: Any, request: Request) -> None:
    secure = is_secure(request)
    response.delete_cookie(
        ui_sessions.cookie_name(secure), path="/", secure=secure, httponly=True, samesite="strict"
    )


@cache
def environment() -> Environment:
    """The dashboard's templates, and the report's (its sections and macros are reused)."""
    return Environment(
        loader=ChoiceLoader(
            [PackageLoader("app.ui", "templates"), PackageLoader("app.report", "templates")]
        ),
        autoescape=select_autoescape(enabled_extensions=("html", "j2"), default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(
    template: str,
    who: Viewer | None,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    html = (
        environment()
        .get_template(template)
        .render(
            viewer=who,
            step_columns=[header for header, _, _ in STEP_COLUMNS],
            **context,
        )
    )
    return HTMLResponse(
        html,
        status_code=status_code,
        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store"},
    )


def see_other(url: str) -> RedirectResponse:
    """After a form: the browser GETs `url` (303)."""
    return RedirectResponse(url, status_code=303)


def safe_next(value: str | None) -> str:
    """Where to go after sign-in: a path inside the dashboard only (no open redirect)."""
    if value and value.startswith("/ui") and not value.startswith("//"):
        return value
    return "/ui"
