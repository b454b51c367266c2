"""A job's event history: written with the change it describes, read by the SSE stream."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from app.db.models import JobEvent
from app.db.repositories.events import JobEventRepository

TERMINAL_EVENT = "done"


def record(session: Session, job_id: str, type_: str, **data: Any) -> None:
    """Add an event to the session; it commits with the state change it reports."""
    JobEventRepository(session).add(job_id, type_, data)


def after(
    session: Session, team_id: str, job_id: str, last_id: int, limit: int = 500
) -> Sequence[JobEvent]:
    return JobEventRepository(session).after(team_id, job_id, last_id, limit)
