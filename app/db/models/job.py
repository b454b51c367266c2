from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import Float, ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db.base import Base, IdMixin, TimestampMixin


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"


TERMINAL_STATUSES = (JobStatus.succeeded, JobStatus.failed, JobStatus.canceled)


class StepStatus(enum.StrEnum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"


class Job(IdMixin, TimestampMixin, Base):
    """A compression job: the request, its lease, progress, metrics and outcome."""

    __tablename__ = "jobs"

    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[str | None] = mapped_column(
        ForeignKey("models.id", ondelete="SET NULL"), index=True
    )
    dataset_id: Mapped[str | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL"), default=None
    )
    status: Mapped[str] = mapped_column(String(20), default=JobStatus.queued, index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    current_step: Mapped[int | None] = mapped_column(default=None)
    preset: Mapped[str | None] = mapped_column(String(50), default=None)
    evaluation: Mapped[dict[str, Any]]
    export: Mapped[list[Any]]
    seed: Mapped[int] = mapped_column(default=0, server_default="0")
    # Versions of the engine and libraries of the worker that last claimed the job, and of the
    # recipe the job was made from (POST /v1/jobs with `recipe`), if it was.
    versions: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    recipe_versions: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    # {"model": {sha256, format}, "dataset": {sha256, format} | None} when the job was created,
    # so its recipe names its inputs after they are deleted.
    materials: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    # The final result's verdict against the floor (engine.quality.verdict).
    quality: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    warnings: Mapped[list[Any] | None] = mapped_column(default=None)
    error: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(default=0)
    lease_token: Mapped[int] = mapped_column(default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    # When the run message was last known in the broker (published, or seen there by the
    # reconciler; None: not published yet, the broker was down) and how many times it was
    # published; the reconciler publishes again only a message the broker lost.
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    publish_count: Mapped[int] = mapped_column(default=0, server_default="0")
    # indexed for /metrics, which reads only the recently claimed and finished (ops-metrics)
    started_at: Mapped[datetime | None] = mapped_column(default=None, index=True)
    finished_at: Mapped[datetime | None] = mapped_column(default=None, index=True)

    steps: Mapped[list[JobStep]] = relationship(
        back_populates="job", order_by="JobStep.index", cascade="all, delete-orphan"
    )


class JobStep(IdMixin, TimestampMixin, Base):
    """One op of a job's pipeline, with its own status, metrics and checkpoint artifact."""

    __tablename__ = "job_steps"
    __table_args__ = (UniqueConstraint("job_id", "index"),)

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    index: Mapped[int]
    op: Mapped[str] = mapped_column(String(50))
    config: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(20), default=StepStatus.pending)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    # The step output's verdict against the floor (only the final result's decides the job).
    quality: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    warnings: Mapped[list[Any] | None] = mapped_column(default=None)
    # Op-specific report (e.g. per-layer sensitivity, layers kept in float, training curves).
    details: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    artifact_id: Mapped[str | None] = mapped_column(String(36), default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None, index=True)

    job: Mapped[Job] = relationship(back_populates="steps")
