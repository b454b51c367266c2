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

from app.config import Settings
from app.db.base import utcnow
from app.db.models import JobStatus, StepStatus
from app.db.repositories import JobRepository
from app.db.repositories.idempotency import purge_created_before
from app.db.session import session_scope
from app.queue import TASK_RUN_JOB, publish
from app.services import events, idempotency, janitor, routing

log = logging.getLogger(__name__)

BATCH = 100


def reconcile_once(settings: Settings) -> dict[str, int]:
    """One pass; safe to run from several processes at once (row locks, SKIP LOCKED)."""
    now = utcnow()
    counts = {"requeued": 0, "failed": 0, "published": 0, "purged_keys": 0}
    with session_scope(settings.database_url) as session:
        jobs = JobRepository(session)
        for job in jobs.lock_expired_leases(now, BATCH):
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
                    jobs.update_step(
                        job.id, job.current_step, status=StepStatus.failed, finished_at=now
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
        for job_id in jobs.lock_unpublished(stale, BATCH):
            queue = routing.queue_of_job(session, settings, job_id)
            if not publish(settings, TASK_RUN_JOB, job_id, queue=queue):
                break  # broker down: the rest wait for the next pass
            jobs.mark_enqueued(job_id)
            counts["published"] += 1
        counts["purged_keys"] = purge_created_before(session, now - idempotency.TTL)
    if any(counts.values()):
        log.info("reconcile: %s", counts)
    janitor.sweep_if_due(settings)
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
