"""The messages rows wait on: publishing them, recording each publish, and telling when one is
lost.

A queued job waits on its run message, a pending model on its inspection message (a dataset
waits on nothing: its headers are read during the upload). Every successful publish is written
on the row: publish_count, and jobs.enqueued_at / models.published_at, the time the message was
last known to be in the broker (published, or seen there by the reconciler since). The
reconciler publishes again only what the broker really lost (`decide`), never on a timer alone;
noting each message it sees lets it check a backlog larger than one batch, batch by batch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from app.config import Settings
from app.db.repositories import JobRepository, ModelInspectionRepository
from app.queue import (
    PRIORITY_FIRST,
    PRIORITY_NEW,
    TASK_INSPECT_MODEL,
    TASK_RUN_JOB,
    Ref,
    Waiting,
    publish,
)
from app.services import routing
from app.services.auth import as_utc


class Action(enum.StrEnum):
    wait = "wait"  # the message may still be on its way
    held = "held"  # the broker holds the message (queued, or with a live worker): note it
    publish = "publish"  # never published, or lost: publish it (again)
    give_up = "give_up"  # lost too many times: the row ends (a model: invalid)


@dataclass(frozen=True)
class Rule:
    """When a published message counts as lost.

    after_s: a message younger than this is never looked for (it may not be written yet).
    in_flight_s: how long a message handed to a worker, unacknowledged, may take before the
        row leaves its waiting state (a job's claim is immediate; an inspection runs for up to
        the inspection time limit). Past that, the worker that took it is gone.
    max_publishes: publishes after which a lost message ends the row (None: never)."""

    after_s: float
    in_flight_s: float
    max_publishes: int | None = None


def job_rule(settings: Settings) -> Rule:
    return Rule(after_s=settings.requeue_after_s, in_flight_s=settings.requeue_after_s)


def inspection_rule(settings: Settings) -> Rule:
    return Rule(
        after_s=settings.requeue_after_s,
        in_flight_s=settings.inspect_time_limit_s + settings.requeue_after_s,
        max_publishes=settings.inspect_max_publishes,
    )


def decide(
    rule: Rule,
    ref: Ref,
    published_at: datetime | None,
    publish_count: int,
    now: datetime,
    broker: Waiting | None,
) -> Action:
    """What to do with a row that still waits on the message `ref`.

    `published_at` is when the message was last known in the broker; `broker` is what the
    broker holds now (app.queue.waiting), or None when its transport cannot be read. Where the
    transport cannot show messages handed to a worker (filesystem) or cannot be read at all,
    only the age counts: in_flight_s, the longest a message may sit with a live worker."""
    if published_at is None:
        return Action.publish
    age = (now - as_utc(published_at)).total_seconds()
    if age < rule.after_s:
        return Action.wait
    if broker is not None and ref in broker.queued:
        return Action.held
    if broker is None or broker.delivered is None:
        if age < rule.in_flight_s:
            return Action.wait
    else:
        delivered_s = broker.delivered.get(ref)
        if delivered_s is not None and delivered_s < rule.in_flight_s:
            return Action.held
    if rule.max_publishes is not None and publish_count >= rule.max_publishes:
        return Action.give_up
    return Action.publish


def publish_job(session: Session, settings: Settings, job_id: str, recovered: bool) -> bool:
    """Publish the job's run message to its queue and record it (the caller commits); a
    recovered job (an attempt already ran) goes ahead of new ones. False if the broker is down."""
    queue = routing.queue_of_job(session, settings, job_id)
    priority = PRIORITY_FIRST if recovered else PRIORITY_NEW
    if not publish(settings, TASK_RUN_JOB, job_id, queue=queue, priority=priority):
        return False
    JobRepository(session).mark_enqueued(job_id)
    return True


def publish_inspection(session: Session, settings: Settings, model_id: str) -> bool:
    """Publish the model's inspection message to the inspection queue and record it (the caller
    commits)."""
    queue = routing.inspection_queue(settings)
    if not publish(settings, TASK_INSPECT_MODEL, model_id, queue=queue, priority=PRIORITY_FIRST):
        return False
    ModelInspectionRepository(session).mark_published(model_id)
    return True


def inspection_lost(settings: Settings, publishes: int) -> dict[str, str | None]:
    """The error of a model whose inspection message was lost `publishes` times."""
    return {
        "code": "inspection_lost",
        "detail": (
            f"The model was sent for inspection {publishes} times and no worker finished "
            "inspecting it (a worker died while inspecting it, or the broker lost the message). "
            f"Check that a worker consumes the queue '{settings.inspection_queue}' (`compaas "
            f"worker --queues {settings.inspection_queue}`) and has the memory to load the "
            "model, then upload it again."
        ),
        "field": None,
    }
