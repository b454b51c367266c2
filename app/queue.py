"""Celery configuration in one place; the API uses it to publish by task name, the worker to run;
the reconciler peeks at what still waits in the broker (`waiting`)."""

from __future__ import annotations

import base64
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery

from app.config import Settings, get_settings

log = logging.getLogger(__name__)

TASK_INSPECT_MODEL = "models.inspect"
TASK_RUN_JOB = "jobs.run"

# Message priorities (Redis: 0 is served first; kombu keeps one list per step of 0, 3, 6, 9 and
# a worker pops them in that order). Work that already waited (a re-queued attempt, whose lease
# expired) and model inspections (short; a user's next request waits on them) go ahead of new
# jobs. The filesystem transport of `compaas up` ignores priorities: its queue is FIFO.
PRIORITY_FIRST = 0
PRIORITY_NEW = 3


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
            # how often an idle worker looks in the folder (kombu's default: 1 s); an upload's
            # inspection waits for the inspection worker's next look
            "polling_interval": 0.2,
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


def publish(
    settings: Settings,
    task_name: str,
    *args: Any,
    queue: str | None = None,
    priority: int = PRIORITY_NEW,
) -> bool:
    """Send a task by name to `queue` (default: settings.default_queue); False (logged) when the
    broker is unreachable: the DB keeps the job."""
    queue = queue or settings.default_queue
    try:
        get_publisher(settings).send_task(
            task_name, args=list(args), queue=queue, priority=priority
        )
    except Exception:
        log.exception(
            "could not publish %s%r; the reconciler will publish it later", task_name, args
        )
        return False
    return True


# ----------------------------------------------------------------------------- what still waits

Ref = tuple[str, str]  # (task name, its first argument: the job or model id)


@dataclass
class Waiting:
    """The messages the broker still holds for the published queues.

    `queued`: in a queue, not yet handed to a worker. `delivered`: handed to a worker and not yet
    acknowledged, with how long ago (seconds); None when the transport cannot tell (the
    filesystem transport keeps them in the worker's memory)."""

    queued: set[Ref] = field(default_factory=set)
    delivered: dict[Ref, float] | None = None


def _ref(payload: Any) -> Ref | None:
    """(task, first arg) of a Celery (protocol 2) message as the transport stores it."""
    try:
        headers = payload.get("headers") or {}
        task = headers["task"]
        body = payload["body"]
        if (payload.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return (str(task), str(args[0])) if args else None
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return None  # not a message of ours


def _redis_waiting(channel: Any, queues: list[str]) -> Waiting:
    client = channel.client
    found = Waiting(delivered={})
    for queue in queues:
        for priority in channel.priority_steps:
            for raw in client.lrange(channel._q_for_pri(queue, priority), 0, -1):
                ref = _ref(json.loads(raw))
                if ref is not None:
                    found.queued.add(ref)
    now = time.time()
    since = {
        (tag.decode() if isinstance(tag, bytes) else tag): float(at)
        for tag, at in client.zrange(channel.unacked_index_key, 0, -1, withscores=True)
    }
    assert found.delivered is not None
    for tag, raw in client.hgetall(channel.unacked_key).items():
        ref = _ref(json.loads(raw)[0])
        tag = tag.decode() if isinstance(tag, bytes) else tag
        if ref is not None:
            age = now - since.get(tag, 0.0)
            found.delivered[ref] = min(age, found.delivered.get(ref, age))
    return found


def _folder_waiting(folder: Path, queues: list[str]) -> Waiting:
    found = Waiting(delivered=None)
    suffixes = tuple(f".{queue}.msg" for queue in queues)
    for path in folder.iterdir():
        if not path.name.endswith(suffixes):
            continue
        try:
            ref = _ref(json.loads(path.read_bytes()))
        except (OSError, ValueError):
            continue  # consumed meanwhile, or still being written
        if ref is not None:
            found.queued.add(ref)
    return found


def waiting(settings: Settings) -> Waiting | None:
    """What the broker still holds for every queue the API publishes to; None for a transport
    this cannot read (then only the age of a publish counts). Raises when the broker is
    unreachable (kombu's OperationalError, redis' ConnectionError, OSError)."""
    queues = settings.published_queues.split(",")
    if settings.broker_url.startswith("filesystem"):
        return _folder_waiting(settings.broker_dir / "queue", queues)
    if not settings.broker_url.startswith("redis"):
        return None
    with get_publisher(settings).connection_for_read() as conn:
        return _redis_waiting(conn.default_channel, queues)


# ----------------------------------------------------------------------------- queue depth


def depths(settings: Settings) -> dict[str, int]:
    """How many messages wait (not yet handed to a worker) in each queue the API publishes to;
    {} for a transport this cannot read. Raises when the broker is unreachable."""
    queues = settings.published_queues.split(",")
    if settings.broker_url.startswith("filesystem"):
        folder = settings.broker_dir / "queue"
        counts = dict.fromkeys(queues, 0)
        for path in folder.iterdir() if folder.is_dir() else ():
            for queue in queues:
                if path.name.endswith(f".{queue}.msg"):
                    counts[queue] += 1
        return counts
    if not settings.broker_url.startswith("redis"):
        return {}
    with get_publisher(settings).connection_for_read() as conn:
        channel = conn.default_channel
        pipe = channel.client.pipeline()
        keys = [(q, channel._q_for_pri(q, p)) for q in queues for p in channel.priority_steps]
        for _, key in keys:
            pipe.llen(key)
        counts = dict.fromkeys(queues, 0)
        for (queue, _), length in zip(keys, pipe.execute(), strict=True):
            counts[queue] += int(length)
        return counts
