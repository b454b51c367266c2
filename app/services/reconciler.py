"""Postgres is the truth about jobs; the queue is only a wake-up call. This keeps them in step.

- queued jobs with no recent publish are published again (Redis may have lost the message);
- running jobs whose lease expired (worker killed, OOM, crash) go back to queued, or fail once
  they used up `max_attempts`, so a poison job cannot loop;
- idempotency keys older than 24 h are purged.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy import delete, or_, select, update

from app.config import Settings
from app.db.base import utcnow
from app.db.models import IdempotencyKey, Job, JobStatus, JobStep, StepStatus
from app.db.session import session_scope
from app.queue import TASK_RUN_JOB, publish
from app.services import events

log = logging.getLogger(__name__)

IDEMPOTENCY_TTL = timedelta(hours=24)
BATCH = 100


def reconcile_once(settings: Settings) -> dict[str, int]:
    """One pass; safe to run from several processes at once (row locks, SKIP LOCKED)."""
    now = utcnow()
    counts = {"requeued": 0, "failed": 0, "published": 0, "purged_keys": 0}
    with session_scope(settings.database_url) as session:
        expired = session.scalars(
            select(Job)
            .where(Job.status == JobStatus.running, Job.lease_expires_at < now)
            .with_for_update(skip_locked=True)
            .limit(BATCH)
        ).all()
        for job in expired:
            if job.attempts >= settings.max_attempts:
                detail = (
                    f"The job stopped responding on {job.attempts} attempts (the worker process "
                    "was killed: out of memory, a native crash, or a hard time limit) and was "
                    "given up. Try a smaller model, dataset or batch, or raise "
                    "COMPAAS_JOB_MEMORY_LIMIT_MB / COMPAAS_JOB_TIME_LIMIT_S."
                )
                error = {
                    "code": "max_attempts_exceeded",
                    "detail": detail,
                    "step": job.current_step,
                }
                job.status = JobStatus.failed
                job.error = error
                job.finished_at = now
                job.lease_expires_at = None
                if job.current_step is not None:
                    session.execute(
                        update(JobStep)
                        .where(JobStep.job_id == job.id, JobStep.index == job.current_step)
                        .values(status=StepStatus.failed, finished_at=now)
                    )
                events.record(session, job.id, "status", status="failed", error=error)
                events.record(session, job.id, events.TERMINAL_EVENT, status="failed")
                counts["failed"] += 1
            else:
                job.status = JobStatus.queued
                job.lease_owner = None
                job.enqueued_at = None
                events.record(
                    session,
                    job.id,
                    "status",
                    status="queued",
                    reason="lease_expired",
                    attempts=job.attempts,
                )
                counts["requeued"] += 1
        stale = utcnow() - timedelta(seconds=settings.requeue_after_s)
        to_publish = list(
            session.scalars(
                select(Job.id)
                .where(
                    Job.status == JobStatus.queued,
                    or_(Job.enqueued_at.is_(None), Job.enqueued_at < stale),
                )
                .order_by(Job.id)
                .with_for_update(skip_locked=True)
                .limit(BATCH)
            ).all()
        )
        for job_id in to_publish:
            if not publish(settings, TASK_RUN_JOB, job_id):
                break  # broker down: the rest wait for the next pass
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.queued)
                .values(enqueued_at=utcnow())
            )
            counts["published"] += 1
        result = session.execute(
            delete(IdempotencyKey).where(IdempotencyKey.created_at < now - IDEMPOTENCY_TTL)
        )
        counts["purged_keys"] = int(result.rowcount or 0)  # type: ignore[attr-defined]
    if any(counts.values()):
        log.info("reconcile: %s", counts)
    return counts


class ReconcilerThread(threading.Thread):
    """Runs reconcile_once every interval until stopped (embedded mode runs it in the API)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="compaas-reconciler", daemon=True)
        self.settings = settings
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.settings.reconcile_interval_s):
            try:
                reconcile_once(self.settings)
            except Exception:
                log.exception("reconcile pass failed; will try again")

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=10)
