"""Postgres is the truth about jobs and models; the queue is only a wake-up call. This keeps them
in step.

- running jobs whose lease expired (worker killed, OOM, crash) go back to queued and are
  published at once ahead of new work, or fail once they used up `max_attempts`, so a poison
  job cannot loop;
- queued jobs and pending models whose message was never published (the broker was down) are
  published; those whose message the broker lost (not in its queues, not with a live worker:
  app.services.publishing.decide) are published again; a model whose inspection was lost
  `inspect_max_publishes` times ends invalid;
- idempotency keys older than 24 h are purged.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy.orm import Session

from app.config import Settings
from app.db.base import utcnow
from app.db.models import JobStatus, ModelStatus, StepStatus
from app.db.repositories import JobRepository, ModelInspectionRepository
from app.db.repositories.idempotency import purge_created_before
from app.db.session import session_scope
from app.queue import TASK_INSPECT_MODEL, TASK_RUN_JOB, Waiting, waiting
from app.services import events, idempotency, janitor
from app.services.publishing import (
    Action,
    decide,
    inspection_lost,
    inspection_rule,
    job_rule,
    publish_inspection,
    publish_job,
)

log = logging.getLogger(__name__)

BATCH = 100


def reconcile_once(settings: Settings) -> dict[str, int]:
    """One pass; safe to run from several processes at once (row locks, SKIP LOCKED)."""
    now = utcnow()
    counts = {
        "requeued": 0,
        "failed": 0,
        "published": 0,
        "inspections_published": 0,
        "inspections_invalid": 0,
        "purged_keys": 0,
    }
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
        session.flush()
        _publish_waiting(session, settings, counts)
        counts["purged_keys"] = purge_created_before(session, now - idempotency.TTL)
    if any(counts.values()):
        log.info("reconcile: %s", counts)
    janitor.sweep_if_due(settings)
    return counts


def _publish_waiting(session: Session, settings: Settings, counts: dict[str, int]) -> None:
    """Publish what was never published or what the broker lost; leave what it still holds."""
    now = utcnow()
    stale = now - timedelta(seconds=settings.requeue_after_s)
    jobs = JobRepository(session)
    models = ModelInspectionRepository(session)
    job_rows = jobs.lock_unpublished(stale, BATCH)
    model_rows = models.lock_unpublished(stale, BATCH)
    if not job_rows and not model_rows:
        return
    broker: Waiting | None = None
    if any(row[1] is not None for row in [*job_rows, *model_rows]):
        try:  # only when a published message may be lost: a read of every queued message
            broker = waiting(settings)
        except Exception:
            log.warning("the broker is unreachable; nothing is published this pass", exc_info=True)
            return
    rule = job_rule(settings)
    held: list[str] = []
    for job_id, published_at, count, attempts in job_rows:
        action = decide(rule, (TASK_RUN_JOB, job_id), published_at, count, now, broker)
        if action is Action.held:
            held.append(job_id)
        elif action is Action.publish:
            if not publish_job(session, settings, job_id, recovered=attempts > 0):
                return  # broker down: the rest wait for the next pass
            counts["published"] += 1
    jobs.mark_held(held)
    rule = inspection_rule(settings)
    held = []
    for model_id, published_at, count in model_rows:
        action = decide(rule, (TASK_INSPECT_MODEL, model_id), published_at, count, now, broker)
        if action is Action.held:
            held.append(model_id)
        elif action is Action.give_up:
            models.record(
                model_id, status=ModelStatus.invalid, error=inspection_lost(settings, count)
            )
            log.warning("model %s: inspection lost %d times; marked invalid", model_id, count)
            counts["inspections_invalid"] += 1
        elif action is Action.publish:
            if not publish_inspection(session, settings, model_id):
                return
            counts["inspections_published"] += 1
    models.mark_held(held)


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
