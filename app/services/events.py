"""A job's event history: written with the change it describes, read by the SSE stream."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import JobEvent

TERMINAL_EVENT = "done"


def record(session: Session, job_id: str, type_: str, **data: Any) -> None:
    """Add an event to the session; it commits with the state change it reports."""
    session.add(JobEvent(job_id=job_id, type=type_, data=data))


def after(session: Session, job_id: str, last_id: int, limit: int = 500) -> Sequence[JobEvent]:
    stmt = (
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.id > last_id)
        .order_by(JobEvent.id)
        .limit(limit)
    )
    return session.scalars(stmt).all()
