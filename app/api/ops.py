"""Operator pages (/metrics, /docs, /redoc, /openapi.json), behind COMPAAS_OPS_TOKEN when set.

Swagger UI and ReDoc are served from the bundles the `fastapi-offline` wheel ships (Swagger UI:
Apache-2.0, ReDoc: MIT, the wheel: MIT), so the pages load nothing from another host."""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Annotated, Any

import fastapi_offline
from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.api.deps import SettingsDep
from app.api.problems import Problem

OPENAPI_URL = "/openapi.json"
DOCS_URL = "/docs"
REDOC_URL = "/redoc"
ASSETS_URL = "/docs/assets"
ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
# The files the pages reference; nothing else in the directory is served.
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
# Swagger UI: the bearer token typed into Authorize is kept across reloads; no validator badge
# (it would fetch from validator.swagger.io).
SWAGGER_PARAMETERS = {"persistAuthorization": True, "validatorUrl": None}

OPS_TOKEN_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "COMPAAS_OPS_TOKEN is set and the request did not send it"}
}

ops_bearer = HTTPBearer(
    scheme_name="OpsToken",
    description="COMPAAS_OPS_TOKEN, for /metrics and the docs pages when the server sets one.",
    auto_error=False,
)


def require_ops_token(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(ops_bearer)],
) -> None:
    """With COMPAAS_OPS_TOKEN set, only `Authorization: Bearer <that token>` gets through."""
    if not settings.ops_token:
        return
    if credentials is not None and hmac.compare_digest(
        credentials.credentials.strip().encode(), settings.ops_token.encode()
    ):
        return
    raise Problem(
        401,
        "ops_token_required",
        "This page is for operators: send `Authorization: Bearer <COMPAAS_OPS_TOKEN>` "
        "(the token the server was started with; team API keys do not open it).",
        headers={"WWW-Authenticate": 'Bearer realm="compaas-ops"'},
    )


OpsTokenDep = Depends(require_ops_token)

router = APIRouter(dependencies=[OpsTokenDep], include_in_schema=False)


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


@router.get(OPENAPI_URL)
def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get(DOCS_URL)
def swagger_ui(request: Request) -> HTMLResponse:
    root = _root(request)
    return get_swagger_ui_html(
        openapi_url=root + OPENAPI_URL,
        title=f"{request.app.title} - API",
        swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
        swagger_ui_parameters=SWAGGER_PARAMETERS,
    )


@router.get(REDOC_URL)
def redoc(request: Request) -> HTMLResponse:
    root = _root(request)
    return get_redoc_html(
        openapi_url=root + OPENAPI_URL,
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
        with_google_fonts=False,
    )


@router.get(ASSETS_URL + "/{name}")
def docs_asset(name: str) -> FileResponse:
    """One of the docs pages' bundled files (ETag and Last-Modified; cached for a day)."""
    if name not in ASSETS:
        raise Problem(
            404,
            "not_found",
            f"No docs asset {name!r}; the docs pages use {', '.join(ASSETS)}.",
        )
    return FileResponse(ASSETS_DIR / name, headers={"Cache-Control": "public, max-age=86400"})
