"""Celery configuration in one place; the API uses it to publish by task name, the worker to run."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from app.config import Settings, get_settings

log = logging.getLogger(__name__)

TASK_INSPECT_MODEL = "models.inspect"
TASK_RUN_JOB = "jobs.run"


def celery_config(settings: Settings) -> dict[str, Any]:
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": "default",
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 3,
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0.2,
            "interval_step": 0.5,
        },
        "worker_hijack_root_logger": False,
        "timezone": "UTC",
    }
    if settings.broker_url.startswith("filesystem"):
        queue_dir = settings.broker_dir / "queue"
        processed = settings.broker_dir / "processed"
        control = settings.broker_dir / "control"
        for folder in (queue_dir, processed, control):
            folder.mkdir(parents=True, exist_ok=True)
        config["broker_transport_options"] = {
            "data_folder_in": str(queue_dir),
            "data_folder_out": str(queue_dir),
            "processed_folder": str(processed),
            "control_folder": str(control),
            "store_processed": False,
        }
    elif settings.broker_url.startswith("redis"):
        # Longer than any job's hard time limit, so Redis does not redeliver a running job.
        config["broker_transport_options"] = {
            "visibility_timeout": settings.broker_visibility_timeout_s
            or settings.job_time_limit_s + 600,
            "socket_timeout": 5,
            "socket_connect_timeout": 3,
        }
    return config


def make_celery(settings: Settings) -> Celery:
    celery = Celery("compaas")
    celery.conf.update(celery_config(settings))
    return celery


_publishers: dict[tuple[str, str], Celery] = {}


def get_publisher(settings: Settings | None = None) -> Celery:
    """A Celery client for these settings (cached per broker)."""
    settings = settings or get_settings()
    key = (settings.broker_url, str(settings.broker_dir))
    if key not in _publishers:
        _publishers[key] = make_celery(settings)
    return _publishers[key]


def publish(settings: Settings, task_name: str, *args: Any, queue: str | None = None) -> bool:
    """Send a task by name to `queue` (default: settings.default_queue); False (logged) when the
    broker is unreachable: the DB keeps the job."""
    queue = queue or settings.default_queue
    try:
        get_publisher(settings).send_task(task_name, args=list(args), queue=queue)
    except Exception:
        log.exception(
            "could not publish %s%r; the reconciler will publish it later", task_name, args
        )
        return False
    return True
