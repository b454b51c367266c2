"""The app's OpenAPI document: FastAPI's, with errors as the problem+json the API sends and
its bearer schemes as the deployment applies them."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from app.api.deps import api_key_bearer
from app.api.ops import ops_bearer
from app.api.problems import document_problems
from app.config import Settings

API_KEY_SCHEME = api_key_bearer.scheme_name
OPS_TOKEN_SCHEME = ops_bearer.scheme_name


def document_security(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Teams' key first in Swagger's Authorize dialog; the ops token is required only where the
    deployment sets COMPAAS_OPS_TOKEN (else `{}`: no credentials is an alternative)."""
    components = schema.setdefault("components", {})
    schemes = components.get("securitySchemes", {})
    components["securitySchemes"] = dict(
        sorted(schemes.items(), key=lambda item: item[0] != API_KEY_SCHEME)
    )
    if not settings.ops_token:
        for item in schema.get("paths", {}).values():
            for operation in item.values():
                if {OPS_TOKEN_SCHEME: []} in operation.get("security", []):
                    operation["security"] = [*operation["security"], {}]
    return schema


def install(app: FastAPI, settings: Settings) -> None:
    """Serve the document built once from the routes, problems and security applied."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_security(
                document_problems(FastAPI.openapi(app)), settings
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
