"""Operator pages (/metrics, /docs, /redoc, /openapi.json), behind COMPAAS_OPS_TOKEN when set."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from app.api.deps import SettingsDep
from app.api.problems import Problem

OPENAPI_URL = "/openapi.json"
DOCS_URL = "/docs"
REDOC_URL = "/redoc"

OPS_TOKEN_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "COMPAAS_OPS_TOKEN is set and the request did not send it"}
}


def require_ops_token(request: Request, settings: SettingsDep) -> None:
    """With COMPAAS_OPS_TOKEN set, only `Authorization: Bearer <that token>` gets through."""
    if not settings.ops_token:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), settings.ops_token.encode()
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


@router.get(OPENAPI_URL)
def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get(DOCS_URL)
def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    return get_swagger_ui_html(openapi_url=root + OPENAPI_URL, title=f"{request.app.title} - API")


@router.get(REDOC_URL)
def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    return get_redoc_html(openapi_url=root + OPENAPI_URL, title=f"{request.app.title} - ReDoc")
