"""The Celery app the worker runs: configuration from app.queue, tasks from worker.tasks."""

from __future__ import annotations

import logging
import socket
from typing import Any

from celery.signals import worker_ready

from app.config import get_settings
from app.queue import make_celery
from app.services import worker_hosts
from worker import sandbox

log = logging.getLogger(__name__)

settings = get_settings()
celery = make_celery(settings)
celery.conf.update(
    include=["worker.tasks.models", "worker.tasks.jobs"],
    worker_max_tasks_per_child=100,
    task_time_limit=settings.job_time_limit_s + 300,
)
app = celery


@worker_ready.connect
def report_protections(**_: Any) -> None:
    """Probe the sandbox once, log which protections hold, record them for /readyz."""
    try:
        found = sandbox.protections()
    except sandbox.SandboxError as exc:
        log.error("sandbox probe failed: %s", exc.detail)
        found = {}
    active = sorted(k for k, v in found.items() if v)
    inactive = sorted(k for k, v in found.items() if not v)
    absent = sandbox.missing(found, settings.sandbox_requirements)
    log.warning(
        "sandbox protections active: %s; inactive: %s; required and missing: %s",
        ", ".join(active) or "none",
        ", ".join(inactive) or "none",
        ", ".join(absent) or "none",
    )
    gpus = sandbox.gpu_devices()
    if settings.device == "cuda" and not gpus:
        log.error(
            "COMPAAS_DEVICE=cuda but this host has no NVIDIA device nodes (/dev/nvidia*): its "
            "training jobs will fail with device_unavailable. Give the container the GPU "
            "(docker compose --profile gpu) or set COMPAAS_DEVICE=auto"
        )
    log.info(
        "torch training: COMPAAS_DEVICE=%s, NVIDIA device nodes: %s",
        settings.device,
        ", ".join(gpus) or "none",
    )
    try:
        worker_hosts.record(settings, socket.gethostname(), found)
    except Exception:
        log.exception("could not record this worker's sandbox protections")
