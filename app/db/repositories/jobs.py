from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Row, Select, and_, func, or_, select, update
from sqlalchemy.orm import Session, selectinload

from app.db.base import utcnow
from app.db.models import Artifact, Job, JobStatus, JobStep, Model, StepStatus
from app.db.models.job import TERMINAL_STATUSES
from app.db.repositories.base import TeamRepository

ACTIVE_STATUSES = (JobStatus.queued, JobStatus.running)
RETRYABLE_STATUSES = (JobStatus.failed, JobStatus.canceled)


class JobRepository:
    """Queries the worker runs on jobs by id (the id came from the team-scoped API)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, job_id: str) -> Job | None:
        stmt = select(Job).where(Job.id == job_id).options(selectinload(Job.steps))
        return self.session.scalars(stmt).first()

    def routing(self, job_id: str) -> tuple[str | None, list[dict[str, Any]]]:
        """The job's model format (None once the model is deleted) and its steps' configs in
        order: what its queue is chosen by."""
        fmt = self.session.scalar(
            select(Model.format).join(Job, Job.model_id == Model.id).where(Job.id == job_id)
        )
        steps = select(JobStep.config).where(JobStep.job_id == job_id).order_by(JobStep.index)
        return fmt, list(self.session.scalars(steps).all())

    def count_active(self, team_id: str) -> int:
        """The team's queued and running jobs."""
        stmt = select(func.count()).where(Job.team_id == team_id, Job.status.in_(ACTIVE_STATUSES))
        return int(self.session.scalar(stmt) or 0)

    def mark_enqueued(self, job_id: str) -> None:
        """Note that the job's run message was just published (while it is still queued)."""
        self.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.queued)
            .values(enqueued_at=utcnow(), publish_count=Job.publish_count + 1)
            .execution_options(synchronize_session=False)
        )

    def lock_expired_leases(self, now: datetime, limit: int) -> Sequence[Job]:
        """Running jobs whose lease ran out, locked (rows another process holds are skipped)."""
        stmt = (
            select(Job)
            .where(Job.status == JobStatus.running, Job.lease_expires_at < now)
            .with_for_update(skip_locked=True)
            .limit(limit)
        )
        return self.session.scalars(stmt).all()

    def mark_held(self, ids: list[str]) -> None:
        """Note that the broker was just seen holding these rows' messages (not a publish)."""
        if ids:
            self.session.execute(
                update(Job)
                .where(Job.id.in_(ids))
                .values(enqueued_at=utcnow())
                .execution_options(synchronize_session=False)
            )

    def lock_unpublished(
        self, published_before: datetime, limit: int
    ) -> list[tuple[str, datetime | None, int, int]]:
        """Queued jobs last published before then, or never published and created before then
        (a newer one's API request may be publishing it right now), locked, oldest first:
        (id, enqueued_at, publish_count, attempts)."""
        stmt = (
            select(Job.id, Job.enqueued_at, Job.publish_count, Job.attempts)
            .where(
                Job.status == JobStatus.queued,
                or_(
                    and_(Job.enqueued_at.is_(None), Job.created_at < published_before),
                    Job.enqueued_at < published_before,
                ),
            )
            .order_by(Job.id)
            .with_for_update(skip_locked=True)
            .limit(limit)
        )
        return [(i, at, count, attempts) for i, at, count, attempts in self.session.execute(stmt)]

    def lock_if_unpublished(self, job_id: str) -> bool:
        """Lock the job's row, waiting for a reconciler pass that holds it; True if it is still
        queued and was never published (else someone else published it: leave it)."""
        stmt = (
            select(Job.enqueued_at)
            .where(Job.id == job_id, Job.status == JobStatus.queued)
            .with_for_update()
        )
        found = self.session.execute(stmt).first()
        return found is not None and found[0] is None

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

    def update_step(
        self, job_id: str, index: int, *, finished_if_open: datetime | None = None, **values: Any
    ) -> None:
        """Set `values` on the step; `finished_if_open` sets finished_at unless already set."""
        if finished_if_open is not None:
            values["finished_at"] = func.coalesce(JobStep.finished_at, finished_if_open)
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

    def replace_checkpoint(self, **values: Any) -> tuple[Artifact, list[str]]:
        """Store a step's checkpoint row in place of any earlier one of the same (job, step):
        the job keeps one checkpoint per step. Returns the new row and the blob keys of the rows
        it replaced (the caller deletes those blobs after commit). Call it only under the
        attempt's fence: then no newer attempt exists that could be resuming from them."""
        old = self.session.scalars(
            select(Artifact).where(
                Artifact.job_id == values["job_id"],
                Artifact.step_index == values["step_index"],
                Artifact.role == "checkpoint",
            )
        ).all()
        replaced = [a.blob_key for a in old if a.blob_key != values["blob_key"]]
        for artifact in old:
            self.session.delete(artifact)
        self.session.flush()
        return self.add_artifact(role="checkpoint", **values), replaced

    def referenced_keys(self, job_id: str, blob_keys: list[str]) -> set[str]:
        """Those of `blob_keys` that an artifact row of the job names (committed, so kept)."""
        if not blob_keys:
            return set()
        stmt = select(Artifact.blob_key).where(
            Artifact.job_id == job_id, Artifact.blob_key.in_(blob_keys)
        )
        return set(self.session.scalars(stmt).all())

    def reset_steps_from(self, job_id: str, index: int) -> None:
        """Steps at `index` and after go back to pending, without their artifacts (the worker
        runs them again: it resumes at `index`)."""
        self.session.execute(
            update(JobStep)
            .where(JobStep.job_id == job_id, JobStep.index >= index)
            .values(status=StepStatus.pending, started_at=None, finished_at=None, artifact_id=None)
            .execution_options(synchronize_session=False)
        )


class TeamJobRepository(TeamRepository[Job]):
    """The API's queries on one team's jobs, their steps and artifacts."""

    def __init__(self, session: Session, team_id: str) -> None:
        super().__init__(session, Job, team_id)

    def _job_id(self, job_id: str) -> Select[Any]:
        """The job's id if it is this team's (for statements on its steps)."""
        return select(Job.id).where(Job.team_id == self.team_id, Job.id == job_id)

    def get_with_steps(self, job_id: str) -> Job | None:
        stmt = self._scoped().where(Job.id == job_id).options(selectinload(Job.steps))
        return self.session.scalars(stmt).first()

    def status_row(self, job_id: str) -> Row[str, str, float, int | None, datetime] | None:
        """(id, status, progress, current_step, updated_at): the job's status view, one row."""
        stmt = select(Job.id, Job.status, Job.progress, Job.current_step, Job.updated_at).where(
            Job.team_id == self.team_id, Job.id == job_id
        )
        return self.session.execute(stmt).first()

    def version_row(self, job_id: str) -> Row[Any] | None:
        """What the job's whole document depends on, in one statement and without its JSON
        columns (app.services.job_views.VERSION_COLUMNS says what each is)."""
        steps = select(JobStep).where(JobStep.job_id == Job.id)
        arts = select(Artifact).where(Artifact.job_id == Job.id, Artifact.team_id == self.team_id)
        stmt = select(
            Job.updated_at,
            Job.model_id,
            Job.dataset_id,
            steps.with_only_columns(func.max(JobStep.updated_at)).scalar_subquery(),
            steps.with_only_columns(func.count(JobStep.artifact_id)).scalar_subquery(),
            arts.with_only_columns(func.count()).scalar_subquery(),
            arts.with_only_columns(func.max(Artifact.id)).scalar_subquery(),
            arts.with_only_columns(func.max(Artifact.updated_at)).scalar_subquery(),
        ).where(Job.team_id == self.team_id, Job.id == job_id)
        return self.session.execute(stmt).first()

    def add_step(self, job_id: str, index: int, op: str, config: dict[str, Any]) -> None:
        self.session.add(JobStep(job_id=job_id, index=index, op=op, config=config))

    def first_active_using(self, **refs: str) -> str | None:
        """The id of an unfinished job that uses this model or dataset (model_id=... etc.)."""
        stmt = select(Job.id).where(
            Job.team_id == self.team_id, Job.status.not_in(TERMINAL_STATUSES)
        )
        for column, value in refs.items():
            stmt = stmt.where(getattr(Job, column) == value)
        return self.session.scalars(stmt).first()

    def cancel(self, job_id: str, error: dict[str, Any]) -> bool:
        """Cancel the job if it is still queued or running; False if it was not."""
        result = self.session.execute(
            update(Job)
            .where(Job.team_id == self.team_id, Job.id == job_id, Job.status.in_(ACTIVE_STATUSES))
            .values(
                status=JobStatus.canceled, finished_at=utcnow(), lease_expires_at=None, error=error
            )
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def reset_unfinished_steps(self, job_id: str) -> None:
        """Steps that did not succeed go back to pending, without an artifact; finished steps
        keep theirs (their checkpoints are where a retry resumes)."""
        self.session.execute(
            update(JobStep)
            .where(JobStep.job_id.in_(self._job_id(job_id)), JobStep.status != StepStatus.succeeded)
            .values(status=StepStatus.pending, started_at=None, finished_at=None, artifact_id=None)
            .execution_options(synchronize_session=False)
        )

    def reset_steps_from(self, job_id: str, index: int) -> None:
        """Steps at `index` and after go back to pending, without their artifacts."""
        self.session.execute(
            update(JobStep)
            .where(JobStep.job_id.in_(self._job_id(job_id)), JobStep.index >= index)
            .values(status=StepStatus.pending, started_at=None, finished_at=None, artifact_id=None)
            .execution_options(synchronize_session=False)
        )

    def requeue(self, job_id: str, progress: float) -> bool:
        """Queue a failed or canceled job again; False if it is neither any more."""
        result = self.session.execute(
            update(Job)
            .where(
                Job.team_id == self.team_id,
                Job.id == job_id,
                Job.status.in_(RETRYABLE_STATUSES),
            )
            .values(
                status=JobStatus.queued,
                error=None,
                finished_at=None,
                current_step=None,
                attempts=0,
                enqueued_at=None,
                progress=progress,
            )
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def steps_of(self, job_ids: list[str]) -> dict[str, list[JobStep]]:
        """The steps of these jobs of the team, in order, by job id."""
        steps = self.session.scalars(
            select(JobStep)
            .join(Job, JobStep.job_id == Job.id)
            .where(Job.team_id == self.team_id, JobStep.job_id.in_(job_ids))
            .order_by(JobStep.index)
        ).all()
        return _by_job(job_ids, steps)

    def naming(self, job_id: str) -> tuple[str | None, list[str]]:
        """The name of the job's model (None once it is deleted) and its steps' ops, in order:
        what its artifacts' download names are made of."""
        model = self.session.scalar(
            select(Model.name)
            .join(Job, Job.model_id == Model.id)
            .where(Job.team_id == self.team_id, Job.id == job_id)
        )
        ops = self.session.scalars(
            select(JobStep.op)
            .where(JobStep.job_id.in_(self._job_id(job_id)))
            .order_by(JobStep.index)
        ).all()
        return model, list(ops)

    def artifacts_of(self, job_ids: list[str]) -> dict[str, list[Artifact]]:
        """The artifacts of these jobs of the team, oldest first, by job id."""
        artifacts = self.session.scalars(
            select(Artifact)
            .where(Artifact.team_id == self.team_id, Artifact.job_id.in_(job_ids))
            .order_by(Artifact.id)
        ).all()
        return _by_job(job_ids, artifacts)


R = TypeVar("R", JobStep, Artifact)


def _by_job(job_ids: list[str], rows: Sequence[R]) -> dict[str, list[R]]:
    """Rows grouped by their job id, every asked-for job present (an empty list if none)."""
    by_job: dict[str, list[R]] = {job_id: [] for job_id in job_ids}
    for row in rows:
        by_job[row.job_id].append(row)
    return by_job
