"""Idempotency keys: looked up and written per team; expired ones purged across teams."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.db.models import IdempotencyKey


class IdempotencyKeyRepository:
    """One team's idempotency keys."""

    def __init__(self, session: Session, team_id: str) -> None:
        self.session = session
        self.team_id = team_id

    def get(self, key: str) -> IdempotencyKey | None:
        stmt = select(IdempotencyKey).where(
            IdempotencyKey.team_id == self.team_id, IdempotencyKey.key == key
        )
        return self.session.scalars(stmt).first()

    def add(self, key: str, **values: Any) -> None:
        """Add the key to the session; it commits with the object it created."""
        self.session.add(IdempotencyKey(team_id=self.team_id, key=key, **values))

    def delete(self, row: IdempotencyKey) -> None:
        self.session.execute(
            delete(IdempotencyKey).where(
                IdempotencyKey.team_id == self.team_id, IdempotencyKey.id == row.id
            )
        )

    def set_response(self, key: str, body: dict[str, Any]) -> None:
        self.session.execute(
            update(IdempotencyKey)
            .where(IdempotencyKey.team_id == self.team_id, IdempotencyKey.key == key)
            .values(response=body)
        )


def purge_created_before(session: Session, cutoff: datetime) -> int:
    """Delete every team's keys created before `cutoff`; return how many (reconciler)."""
    result = session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < cutoff))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
