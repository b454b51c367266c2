"""RFC 9457 problem+json: the API's `Problem`, domain errors mapped to it, other handlers."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import logs
from app.errors import AppError, Conflict, Invalid, LimitReached, NotFound, Unavailable
from app.redact import relative_paths

log = logging.getLogger(__name__)

PROBLEM_BASE = "https://compaas.dev/problems/"
MEDIA_TYPE = "application/problem+json"


class Problem(Exception):
    """An error the client can act on: status, stable code, a detail that says what to do."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        title: str | None = None,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        detail = relative_paths(detail)
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.title = title or code.replace("_", " ").capitalize()
        self.field = field
        self.headers = headers
        self.extra = extra

    def body(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": PROBLEM_BASE + self.code,
            "title": self.title,
            "status": self.status,
            "code": self.code,
            "detail": self.detail,
        }
        if self.field:
            body["field"] = self.field
        if instance:
            body["instance"] = instance
        body.update(self.extra)
        return body


class FieldErrorRead(BaseModel):
    """One invalid part of a request (`validation_error` lists every one)."""

    field: str = Field(description="Where: `name`, `pipeline[0].sparsity`, `limit`…")
    message: str


class ProblemRead(BaseModel):
    """An RFC 9457 problem: `code` is stable, `detail` says what was wrong and how to fix it.

    Some codes add members of their own (e.g. `max_steps`, `limit_bytes`, `valid_ops`)."""

    model_config = ConfigDict(extra="allow", title="Problem")

    type: str = Field(description="A URI naming the kind of problem: " + PROBLEM_BASE + "<code>")
    title: str = Field(description="The code in words")
    status: int = Field(ge=400, le=599, description="The HTTP status of this answer")
    code: str = Field(description="Stable, machine-readable: branch on this")
    detail: str = Field(description="What was wrong and how to fix it")
    field: str | None = Field(None, description="The request part at fault, when one is")
    instance: str | None = Field(None, description="The path the request was sent to")
    errors: list[FieldErrorRead] | None = Field(
        None, description="validation_error: every invalid part of the request"
    )
    input: str | None = Field(
        None, description="A dataset that does not fit the model: the model input concerned"
    )


STATUS: dict[type[AppError], int] = {
    Invalid: 422,
    NotFound: 404,
    Conflict: 409,
    LimitReached: 429,
    Unavailable: 503,
}


def problem_for(error: AppError) -> Problem:
    """The problem+json a domain error is answered with (its kind gives the status)."""
    status = next((STATUS[k] for k in type(error).__mro__ if k in STATUS), 500)
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    return Problem(
        status, error.code, error.detail, field=error.field, headers=headers, **error.extra
    )


def problem_response(problem: Problem, request: Request | None = None) -> JSONResponse:
    return JSONResponse(
        problem.body(request.url.path if request else None),
        status_code=problem.status,
        media_type=MEDIA_TYPE,
        headers=problem.headers,
    )


def _loc(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out


ERROR_DESCRIPTIONS = {
    "401": "No API key, or one that is not valid, expired or revoked",
    "422": "The request is invalid: `field` and `errors` say where",
    "default": "An error (RFC 9457 problem+json; `code` says which)",
}


def document_problems(schema: dict[str, Any]) -> dict[str, Any]:
    """Every operation's 4xx/5xx answers as problem+json with the `Problem` schema (instead of
    FastAPI's HTTPValidationError), a 401 on those that take an API key, and a `default`."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    problem = ProblemRead.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(problem.pop("$defs", {}))
    components["Problem"] = problem
    content = {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            responses = operation.setdefault("responses", {})
            if operation.get("security"):
                responses.setdefault("401", {})
            for status, response in responses.items():
                if status == "default" or status[0] in "45":
                    description = response.get("description") or ERROR_DESCRIPTIONS.get(
                        status, "An error"
                    )
                    if status == "422" and "Validation Error" in description:
                        description = ERROR_DESCRIPTIONS["422"]
                    responses[status] = {"description": description, "content": content}
            responses["default"] = {
                "description": ERROR_DESCRIPTIONS["default"],
                "content": content,
            }
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return schema


def install(app: FastAPI) -> None:
    """Register the problem+json handlers on the app (app.api.openapi documents them)."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc, request)

    @app.exception_handler(AppError)
    async def _domain(request: Request, exc: AppError) -> JSONResponse:
        return problem_response(problem_for(exc), request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": _loc(tuple(e.get("loc", ()))), "message": str(e.get("msg", ""))}
            for e in exc.errors()
        ]
        first = errors[0] if errors else {"field": None, "message": "invalid request"}
        detail = "; ".join(f"{e['field'] or 'body'}: {e['message']}" for e in errors)
        problem = Problem(
            422, "validation_error", detail, field=first["field"] or None, errors=errors
        )
        return problem_response(problem, request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers) if exc.headers else None
        problem = Problem(exc.status_code, code, str(exc.detail), headers=headers)
        return problem_response(problem, request)

    @app.exception_handler(OperationalError)
    async def _db_down(request: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable: %s", exc)
        problem = Problem(
            503,
            "database_unavailable",
            "The database is unavailable; nothing was changed. Retry shortly.",
            headers={"Retry-After": "5"},
        )
        return problem_response(problem, request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        # ops-metrics: the id of the log lines that tell what happened, for the caller to quote
        request_id = logs.current("request_id")
        where = f" under request id {request_id} (quote it when you report this)"
        problem = Problem(
            500,
            "internal_error",
            f"An unexpected error occurred; it has been logged{where if request_id else ''}.",
            **({"request_id": request_id} if request_id else {}),
        )
        return problem_response(problem, request)
