"""Idempotency-Key on creates: the same key and body replay the first response for 24 h."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import IdempotencyKey
from app.db.repositories.idempotency import IdempotencyKeyRepository
from app.errors import Conflict, Invalid

TTL = timedelta(hours=24)


@dataclass(frozen=True)
class IdempotentRequest:
    key: str
    route: str
    fingerprint: str


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def find(session: Session, team_id: str, request: IdempotentRequest) -> IdempotencyKey | None:
    """The stored first response for this key, or None; a different body with it is a 422."""
    keys = IdempotencyKeyRepository(session, team_id)
    row = keys.get(request.key)
    if row is None:
        return None
    if row.created_at.replace(tzinfo=row.created_at.tzinfo or utcnow().tzinfo) < utcnow() - TTL:
        keys.delete(row)
        session.commit()
        return None
    if row.route != request.route or row.fingerprint != request.fingerprint:
        raise Invalid(
            "idempotency_key_reused",
            f"Idempotency-Key {request.key!r} was already used with a different request "
            f"({row.route}). Use a new key for a new request.",
            field="Idempotency-Key",
        )
    return row


def remember(
    session: Session,
    team_id: str,
    request: IdempotentRequest,
    status_code: int,
    object_id: str,
    location: str,
) -> None:
    """Record the key in the same transaction as the object it created."""
    IdempotencyKeyRepository(session, team_id).add(
        request.key,
        route=request.route,
        fingerprint=request.fingerprint,
        status_code=status_code,
        response={"id": object_id},
        location=location,
    )


def save_response(
    session: Session, team_id: str, request: IdempotentRequest, body: dict[str, Any]
) -> None:
    """Store the exact first response body, so replays return it byte for byte."""
    IdempotencyKeyRepository(session, team_id).set_response(request.key, body)
    session.commit()


def in_use() -> Conflict:
    return Conflict(
        "idempotency_key_in_use",
        "A request with this Idempotency-Key is being processed; retry in a moment.",
        field="Idempotency-Key",
        retry_after=1,
    )
