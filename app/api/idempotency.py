"""Route helpers for the Idempotency-Key header."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Header
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from app.services import idempotency
from app.services.idempotency import IdempotentRequest

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        description="Retry-safe creates: the same key and body replay the first response (24 h).",
    ),
]


def request_for(key: str | None, route: str, *parts: Any) -> IdempotentRequest | None:
    if key is None:
        return None
    return IdempotentRequest(key, route, idempotency.fingerprint(route, *parts))


def replay(
    session: Session,
    team_id: str,
    idem: IdempotentRequest | None,
    reread: Callable[[str], dict[str, Any]],
) -> JSONResponse | None:
    """The first response again, if this key was used before with the same request."""
    if idem is None:
        return None
    row = idempotency.find(session, team_id, idem)
    if row is None:
        return None
    body = row.response if set(row.response) != {"id"} else reread(row.response["id"])
    headers = {"Idempotent-Replayed": "true"}
    if row.location:
        headers["Location"] = row.location
    return JSONResponse(body, status_code=row.status_code, headers=headers)
