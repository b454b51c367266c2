"""Which queue a task is published to: a model inspection goes to the inspection queue
(COMPAAS_INSPECT_QUEUE, consumed by a worker of its own, so uploads never wait behind jobs).
With GPU workers in the deployment (COMPAAS_GPU_QUEUE), a job that trains a torch model goes to
their queue; every other job goes to the default queue, which CPU workers consume.

The route is recomputed from the job's row each time it is published (create, retry, the
reconciler's re-publish), so a re-published job goes where it first went while the settings
stay the same, and follows them when an operator changes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from app.config import Settings
from app.db.repositories import JobRepository
from engine.config import PipelineError, parse_pipeline, plan_pipeline, wants_gpu


def inspection_queue(settings: Settings) -> str:
    """The queue of model inspections: COMPAAS_INSPECT_QUEUE, or the default queue when empty."""
    return settings.inspection_queue


def job_queue(
    settings: Settings, model_format: str | None, pipeline: Sequence[dict[str, Any]]
) -> str:
    """The GPU queue for a .pt2 whose pipeline trains on torch (fine_tune, distill, prune with
    training, QAT, or an auto search, whose distillation-backed candidates train) when the
    deployment has one; the default queue otherwise."""
    if not settings.gpu_queue or model_format != "pt2":
        return settings.default_queue
    try:
        configs = parse_pipeline(list(pipeline))
        trains = wants_gpu(configs, plan_pipeline(configs, model_format), model_format)
    except (PipelineError, ValueError):  # the worker refuses it, wherever it runs
        trains = False
    return settings.gpu_queue if trains else settings.default_queue


def queue_of_job(session: Session, settings: Settings, job_id: str) -> str:
    """The queue the job's row routes it to (job_queue)."""
    if not settings.gpu_queue:
        return settings.default_queue
    model_format, pipeline = JobRepository(session).routing(job_id)
    return job_queue(settings, model_format, pipeline)
