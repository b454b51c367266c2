from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, selectinload

from app.db.base import utcnow
from app.db.models import Artifact, Job, JobStatus, JobStep


class JobRepository:
    """Queries the worker runs on jobs by id (the id came from the team-scoped API)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, job_id: str) -> Job | None:
        stmt = select(Job).where(Job.id == job_id).options(selectinload(Job.steps))
        return self.session.scalars(stmt).first()

    def count_active(self, team_id: str) -> int:
        """The team's queued and running jobs."""
        stmt = select(func.count()).where(
            Job.team_id == team_id, Job.status.in_([JobStatus.queued, JobStatus.running])
        )
        return int(self.session.scalar(stmt) or 0)

    def claim(self, job_id: str, owner: str, lease_until: datetime) -> int | None:
        """Take a queued job (or one whose lease expired); return the new fencing token."""
        now = utcnow()
        claimable = (Job.status == JobStatus.queued) | (
            (Job.status == JobStatus.running) & (Job.lease_expires_at < now)
        )
        result = self.session.execute(
            update(Job)
            .where(Job.id == job_id, claimable)
            .values(
                status=JobStatus.running,
                lease_token=Job.lease_token + 1,
                lease_owner=owner,
                lease_expires_at=lease_until,
                attempts=Job.attempts + 1,
                started_at=now,
                updated_at=now,
            )
            .returning(Job.lease_token)
            .execution_options(synchronize_session=False)
        )
        token = result.scalar_one_or_none()
        return int(token) if token is not None else None

    def update_fenced(self, job_id: str, token: int, **values: Any) -> bool:
        """Update the job only while our lease token is still current."""
        values.setdefault("updated_at", utcnow())
        result = self.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.lease_token == token, Job.status == JobStatus.running)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def update_step(self, job_id: str, index: int, **values: Any) -> None:
        values.setdefault("updated_at", utcnow())
        self.session.execute(
            update(JobStep)
            .where(JobStep.job_id == job_id, JobStep.index == index)
            .values(**values)
            .execution_options(synchronize_session=False)
        )

    def add_artifact(self, **values: Any) -> Artifact:
        artifact = Artifact(**values)
        self.session.add(artifact)
        self.session.flush()
        return artifact
