"""Job events: appended with the change they describe, read back in order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Job, JobEvent


class JobEventRepository:
    """Events by job id (writers got the id from a claimed or team-scoped job)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, job_id: str, type_: str, data: dict[str, Any]) -> None:
        """Add an event to the session; it commits with the state change it reports."""
        self.session.add(JobEvent(job_id=job_id, type=type_, data=data))

    def after(self, team_id: str, job_id: str, last_id: int, limit: int) -> Sequence[JobEvent]:
        """The team's job's events after `last_id`, oldest first."""
        stmt = (
            select(JobEvent)
            .join(Job, JobEvent.job_id == Job.id)
            .where(Job.team_id == team_id, JobEvent.job_id == job_id, JobEvent.id > last_id)
            .order_by(JobEvent.id)
            .limit(limit)
        )
        return self.session.scalars(stmt).all()

    def of_type(self, job_id: str, type_: str) -> list[dict[str, Any]]:
        """The data of a job's events of one type, oldest first (the worker reads back the
        auto search's `candidate` events of earlier attempts of the job it claimed)."""
        stmt = (
            select(JobEvent.data)
            .where(JobEvent.job_id == job_id, JobEvent.type == type_)
            .order_by(JobEvent.id)
        )
        return [dict(data) for data in self.session.scalars(stmt).all()]
