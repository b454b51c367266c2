"""The Celery app the worker runs: configuration from app.queue, tasks from worker.tasks."""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from celery.signals import setup_logging, task_postrun, task_prerun, worker_ready

from app import logs
from app.config import get_settings
from app.queue import TASK_INSPECT_MODEL, TASK_RUN_JOB, make_celery
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

# ops-metrics: how often the worker's main process records that its host is alive
HEARTBEAT_S = 15.0


@setup_logging.connect
def configure_logging(loglevel: Any = None, **_: Any) -> None:
    """ops-metrics: structlog (JSON, or console on a terminal) instead of Celery's own format,
    in the main process and, inherited, in every pool process."""
    logs.configure("worker", settings.log_format, level=loglevel or logging.INFO)


# ops-metrics: the id each task's log lines carry, by task name (its first argument)
TASK_IDS = {TASK_RUN_JOB: "job_id", TASK_INSPECT_MODEL: "model_id"}


@task_prerun.connect
def bind_task_ids(task_id: str | None = None, task: Any = None, args: Any = None, **_: Any) -> None:
    """Every line logged while the task runs (runner, relayed engine events, Celery's own
    "succeeded in" line) carries the task id and the job's or model's id."""
    logs.clear()
    ids: dict[str, Any] = {"task_id": task_id}
    name = TASK_IDS.get(getattr(task, "name", ""))
    if name and args:
        ids[name] = str(args[0])
    logs.bind_more(**ids)


@task_postrun.connect
def unbind_task_ids(**_: Any) -> None:
    logs.clear()


def _heartbeat(hostname: str, stop: threading.Event) -> None:
    """Touch the host's worker_hosts row every HEARTBEAT_S (compaas_worker_last_seen_*)."""
    while not stop.wait(HEARTBEAT_S):
        try:
            worker_hosts.touch(settings, hostname)
        except Exception as exc:
            log.warning("worker heartbeat not recorded: %s", type(exc).__name__)


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
    # ops-metrics: a daemon thread in the main process, which lives as long as the worker
    threading.Thread(
        target=_heartbeat,
        args=(socket.gethostname(), threading.Event()),
        name="compaas-heartbeat",
        daemon=True,
    ).start()
