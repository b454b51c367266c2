"""Routing through the real publish path: with a GPU queue configured, a job that trains a
torch model is published to it (on create and on the reconciler's re-publish) and run by a
worker that consumes only that queue; a job that trains nothing waits for a CPU worker.

The "GPU" worker here trains on the CPU (COMPAAS_DEVICE=auto on a machine without a GPU): this
tests where jobs go, not CUDA."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import update

from app.db.models import Job
from app.db.session import session_scope
from app.services.reconciler import reconcile_once
from tests.conftest import PG_ADMIN_URL, RedisServer
from tests.integration.conftest import Stack, start_stack

pytestmark = pytest.mark.integration

SUFFIX = uuid.uuid4().hex[:8]
CPU_QUEUE, GPU_QUEUE = f"cpu-{SUFFIX}", f"gpu-{SUFFIX}"
INSPECT_QUEUE = f"inspect-{SUFFIX}"


@pytest.fixture(scope="module")
def routed(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Postgres (a database of its own: the reconciler pass sees only these jobs) + Redis, a
    CPU queue and a GPU queue, no worker and no reconciler thread until a test starts one."""
    name = f"compaas_routing_{SUFFIX}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    tmp = tmp_path_factory.mktemp("routing")
    env = {
        "COMPAAS_MODE": "embedded",
        "COMPAAS_DATA_DIR": str(tmp),
        "COMPAAS_DATABASE_URL": f"{base}/{name}",
        "COMPAAS_BROKER_URL": redis_url,
        "COMPAAS_WORKER_QUEUES": CPU_QUEUE,
        "COMPAAS_GPU_QUEUE": GPU_QUEUE,
        "COMPAAS_INSPECT_QUEUE": INSPECT_QUEUE,
        "COMPAAS_RUN_RECONCILER": "false",
        "COMPAAS_API_KEY_PEPPER": "integration-test-pepper",
        "COMPAAS_JOB_MEMORY_LIMIT_MB": "6144",
    }
    try:
        yield from start_stack("routing", env, tmp, workers=0)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _queued(redis: RedisServer, queue: str, task: str = "jobs.run") -> list[str]:
    """The first argument (a job or model id) of each `task` message waiting in a queue."""
    ids = []
    keys = [queue, *(f"{queue}\x06\x16{priority}" for priority in (3, 6, 9))]  # kombu's lists
    raws = [raw for key in keys for raw in redis.client().lrange(key, 0, -1)]
    for raw in raws:
        message = json.loads(raw)
        if message["headers"]["task"] == task:
            args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
            ids.append(args[0])
    return ids


def test_training_jobs_go_to_the_gpu_queue_and_the_reconciler_keeps_them_there(
    routed: Stack, redis_server: RedisServer, digits_files: dict[str, Path]
) -> None:
    _, headers = routed.new_team("routing")
    model = routed.upload("models", digits_files["pt2"], headers, name="digits").json()
    # an inspection goes to the inspection queue, whatever the model
    assert _queued(redis_server, INSPECT_QUEUE, "models.inspect") == [model["id"]]
    assert _queued(redis_server, CPU_QUEUE, "models.inspect") == []
    assert routed.inspect_here(model["id"], headers)["status"] == "ready"
    dataset = routed.upload("datasets", digits_files["npz"], headers).json()

    def create(pipeline: list[dict[str, object]]) -> str:
        body = {"model_id": model["id"], "dataset_id": dataset["id"], "pipeline": pipeline}
        resp = routed.client.post("/v1/jobs", json=body, headers=headers)
        assert resp.status_code == 202, resp.text
        return str(resp.json()["id"])

    train = create([{"op": "fine_tune", "epochs": 1}])
    plain = create([{"op": "quantize", "mode": "dynamic", "dtype": "int8"}])
    assert _queued(redis_server, GPU_QUEUE) == [train]
    assert _queued(redis_server, CPU_QUEUE) == [plain]

    # Redis lost nothing, but the reconciler thinks the messages are stale: it publishes both
    # again, each to the queue it was routed to.
    with session_scope(routed.settings.database_url) as session:
        long_ago = datetime.now(UTC) - timedelta(hours=1)  # never published, not just created
        session.execute(
            update(Job)
            .where(Job.id.in_([train, plain]))
            .values(enqueued_at=None, created_at=long_ago)
        )
    assert reconcile_once(routed.settings)["published"] == 2
    assert _queued(redis_server, GPU_QUEUE) == [train, train]
    assert _queued(redis_server, CPU_QUEUE) == [plain, plain]

    # A worker that consumes only the GPU queue runs the training job (twice delivered, run
    # once) and leaves the other for a CPU worker.
    routed.start_worker(queues=GPU_QUEUE)
    job = routed.wait_job(train, headers, timeout=600)
    assert job["status"] == "succeeded", job["error"]
    assert job["steps"][0]["details"]["device"] == "cpu"  # no GPU on this machine
    assert _queued(redis_server, CPU_QUEUE) == [plain, plain]
    other = routed.client.get(f"/v1/jobs/{plain}", headers=headers).json()
    assert other["status"] == "queued"
