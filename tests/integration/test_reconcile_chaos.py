"""Every state that waits on a message is reconciled, only lost messages are published again,
and recovered work goes first: a Redis server, a Postgres cluster and workers of this module's
own, which the tests shut down, flush and kill. Nothing here touches the machine's services."""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from app.db.models import Job, Model
from app.db.session import session_scope
from app.queue import (
    PRIORITY_FIRST,
    PRIORITY_NEW,
    TASK_INSPECT_MODEL,
    TASK_RUN_JOB,
    get_publisher,
    publish,
    waiting,
)
from app.services.reconciler import reconcile_once
from tests.integration.conftest import (
    PostgresCluster,
    RedisServer,
    Stack,
    chaos_env,
    slow_mlp,
    start_stack,
    wait_for,
)

pytestmark = pytest.mark.integration

SLOW_STEP = [
    {"op": "quantize", "mode": "static", "dtype": "int8", "calibration": {"samples": 2000}}
]
REQUEUE_AFTER_S = 4


@pytest.fixture(scope="module")
def rc_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer.running(tmp_path_factory.mktemp("rc-redis")) as server:
        yield server


@pytest.fixture(scope="module")
def rc_postgres() -> Iterator[PostgresCluster]:
    with PostgresCluster.running() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def rc_stack(
    tmp_path_factory: pytest.TempPathFactory, rc_redis: RedisServer, rc_postgres: PostgresCluster
) -> Iterator[Stack]:
    """Tight leases and a reconciler every second in the API process; no worker yet."""
    tmp = tmp_path_factory.mktemp("rc-stack")
    env = chaos_env(
        tmp,
        rc_postgres.create_database(),
        rc_redis.url,
        "rc",
        COMPAAS_REQUEUE_AFTER_S=str(REQUEUE_AFTER_S),
        COMPAAS_INSPECT_MAX_PUBLISHES="3",
    )
    yield from start_stack("reconcile", env, tmp, workers=0)


@pytest.fixture(scope="module")
def slow_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An MLP 64-1024-1024-10: its static int8 job takes a few seconds."""
    return slow_mlp(tmp_path_factory.mktemp("rc-slow"))


@pytest.fixture(scope="module")
def team(rc_stack: Stack) -> dict[str, str]:
    return rc_stack.new_team("reconcile")[1]


@pytest.fixture(scope="module")
def slow(rc_stack: Stack, team: dict[str, str], slow_files: dict[str, Path]) -> dict[str, str]:
    return rc_stack.upload_ready(slow_files, team)


@pytest.fixture(autouse=True)
def _clean(rc_stack: Stack, team: dict[str, str], rc_redis: RedisServer) -> Iterator[None]:
    """After each test: no worker, no job left queued or running, an empty broker."""
    yield
    rc_stack.stop_workers()
    with session_scope(rc_stack.settings.database_url) as session:
        active = session.scalars(select(Job.id).where(Job.status.in_(["queued", "running"])))
        ids = list(active)
    for job_id in ids:
        rc_stack.client.post(f"/v1/jobs/{job_id}/cancel", headers=team)
    if rc_redis.ping():
        rc_redis.client().flushall()  # this module's own server


def submit(stack: Stack, team: dict[str, str], slow: dict[str, str]) -> str:
    body = {**slow, "pipeline": SLOW_STEP, "evaluation": {"task": "generic"}}
    resp = stack.client.post("/v1/jobs", json=body, headers=team)
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def status(stack: Stack, team: dict[str, str], job_id: str) -> dict[str, Any]:
    return dict(stack.client.get(f"/v1/jobs/{job_id}", headers=team).json())


def row(stack: Stack, table: type[Job] | type[Model], row_id: str) -> Any:
    with session_scope(stack.settings.database_url) as session:
        found = session.get(table, row_id)
        assert found is not None
        session.expunge(found)
        return found


def _args(raw: list[bytes], task: str) -> list[str]:
    """The first argument of each `task` message among these raw Redis entries."""
    out = []
    for item in raw:
        message = json.loads(item)
        if message["headers"]["task"] == task:
            out.append(json.loads(base64.b64decode(message["body"]))[0][0])
    return out


def test_the_broker_shows_queued_messages_of_every_priority_and_deliveries(
    rc_stack: Stack,
) -> None:
    settings = rc_stack.settings
    assert publish(settings, TASK_RUN_JOB, "new", priority=PRIORITY_NEW)
    assert publish(settings, TASK_RUN_JOB, "recovered", priority=PRIORITY_FIRST)
    assert publish(settings, TASK_INSPECT_MODEL, "model")
    found = waiting(settings)
    assert found is not None
    assert found.queued == {
        (TASK_RUN_JOB, "new"),
        (TASK_RUN_JOB, "recovered"),
        (TASK_INSPECT_MODEL, "model"),
    }
    assert found.delivered == {}
    with get_publisher(settings).connection_for_read() as conn:
        # what a worker does: take the next message, unacknowledged (the recovered job first)
        message = conn.default_channel.basic_get(settings.default_queue, no_ack=False)
        assert message.payload[0] == ["recovered"]
        found = waiting(settings)
        assert found is not None
        assert (TASK_RUN_JOB, "recovered") not in found.queued
        assert found.delivered is not None
        assert 0 <= found.delivered[(TASK_RUN_JOB, "recovered")] < 5
        message.ack()


def test_a_model_uploaded_while_redis_is_down_is_ready_within_60_s_of_its_return(
    rc_stack: Stack, team: dict[str, str], slow_files: dict[str, Path], rc_redis: RedisServer
) -> None:
    rc_stack.start_worker()
    rc_redis.shutdown()
    try:
        resp = rc_stack.upload("models", slow_files["onnx"], team)
        assert resp.status_code == 201, resp.text
        model_id = resp.json()["id"]
        assert resp.json()["status"] == "pending"
        stored = row(rc_stack, Model, model_id)
        assert stored.published_at is None and stored.publish_count == 0
        time.sleep(2)  # reconciler passes while Redis is down publish nothing
        assert row(rc_stack, Model, model_id).publish_count == 0
    finally:
        rc_redis.start()
    back = time.monotonic()
    body = rc_stack.wait_model(model_id, team)
    took = time.monotonic() - back
    assert body["status"] == "ready", body["error"]
    assert took < 60, took
    assert row(rc_stack, Model, model_id).publish_count == 1


def test_a_lost_inspection_is_published_again_then_ends_invalid_with_the_reason(
    rc_stack: Stack, team: dict[str, str], slow_files: dict[str, Path], rc_redis: RedisServer
) -> None:
    """No worker; the broker loses the message every time: published 3 times, then invalid."""
    model_id = rc_stack.upload("models", slow_files["onnx"], team).json()["id"]
    assert row(rc_stack, Model, model_id).publish_count == 1

    def ended() -> dict[str, Any] | None:
        rc_redis.client().flushall()
        body = rc_stack.client.get(f"/v1/models/{model_id}", headers=team).json()
        return body if body["status"] != "pending" else None

    body = wait_for(ended, timeout=60, interval=0.5)
    assert body["status"] == "invalid"
    assert body["error"]["code"] == "inspection_lost"
    assert "3 times" in body["error"]["detail"]
    assert row(rc_stack, Model, model_id).publish_count == 3


def test_a_30_job_backlog_produces_no_duplicate_publish(
    rc_stack: Stack, team: dict[str, str], slow: dict[str, str], rc_redis: RedisServer
) -> None:
    ids = [submit(rc_stack, team, slow) for _ in range(30)]
    # Several reconciler passes (one a second) well past REQUEUE_AFTER_S, and a few of ours.
    time.sleep(3 * REQUEUE_AFTER_S)
    for _ in range(3):
        assert reconcile_once(rc_stack.settings)["published"] == 0
    assert sorted(_queued_jobs(rc_stack)) == sorted(ids)
    assert {row(rc_stack, Job, i).publish_count for i in ids} == {1}
    # Lost for real: each is published again, once.
    rc_redis.client().flushall()
    wait_for(lambda: len(_queued_jobs(rc_stack)) == 30, timeout=3 * REQUEUE_AFTER_S)
    time.sleep(2 * REQUEUE_AFTER_S)
    assert sorted(_queued_jobs(rc_stack)) == sorted(ids)
    assert {row(rc_stack, Job, i).publish_count for i in ids} == {2}


def _queued_jobs(stack: Stack) -> list[str]:
    with get_publisher(stack.settings).connection_for_read() as conn:
        channel = conn.default_channel
        queue = stack.settings.default_queue
        raw = [
            m
            for p in channel.priority_steps
            for m in channel.client.lrange(channel._q_for_pri(queue, p), 0, -1)
        ]
    return _args(raw, TASK_RUN_JOB)


def test_a_killed_workers_job_goes_ahead_of_20_queued_and_finishes_within_60_s(
    rc_stack: Stack, team: dict[str, str], slow: dict[str, str]
) -> None:
    worker = rc_stack.start_worker()
    victim = submit(rc_stack, team, slow)
    wait_for(lambda: status(rc_stack, team, victim)["status"] == "running", 60, 0.1)
    backlog = [submit(rc_stack, team, slow) for _ in range(20)]
    time.sleep(1)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    killed = time.monotonic()
    rc_stack.start_worker()
    done = rc_stack.wait_job(victim, team, timeout=90)
    took = time.monotonic() - killed
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    assert took < 60, took
    finished = [j for j in backlog if status(rc_stack, team, j)["status"] == "succeeded"]
    # The new worker took one backlog job before the lease ran out; the victim came next.
    assert len(finished) <= 2, finished
    assert row(rc_stack, Job, victim).publish_count == 2
