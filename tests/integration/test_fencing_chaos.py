"""A stale attempt never touches its successor's work, a short Postgres restart costs no
attempt, and retry after cancel resumes from the stored checkpoint: real workers on this
module's own Redis and Postgres cluster, which the tests freeze (SIGSTOP), stop and restart.
Nothing here touches the machine's services or processes the tests did not start."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from app.db.models import Artifact, Job, JobEvent, JobStep
from app.db.session import session_scope
from app.storage import get_blob_store
from tests.integration.conftest import (
    PostgresCluster,
    RedisServer,
    Stack,
    chaos_env,
    slow_mlp,
    start_stack,
    wait_for,
)
from tests.integration.test_reliability import (
    BELOW_FLOOR_OK,
    TWO_STEPS,
    done_events,
    events,
    job,
    proc_stat,
    submit,
    wait_running,
    worker_log_text,
)

pytestmark = pytest.mark.integration

LEASE_S = 8


@pytest.fixture(scope="module")
def fence_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer.running(tmp_path_factory.mktemp("fence-redis")) as server:
        yield server


@pytest.fixture(scope="module")
def fence_postgres() -> Iterator[PostgresCluster]:
    """This module's own Postgres cluster: a test stops and starts it."""
    with PostgresCluster.running() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def rel_stack(
    tmp_path_factory: pytest.TempPathFactory,
    fence_redis: RedisServer,
    fence_postgres: PostgresCluster,
) -> Iterator[Stack]:
    """Tight leases and a fast reconciler, so a frozen worker loses its job within seconds."""
    tmp = tmp_path_factory.mktemp("fencing-stack")
    env = chaos_env(
        tmp,
        fence_postgres.create_database(),
        fence_redis.url,
        "fence",
        COMPAAS_LEASE_S=str(LEASE_S),
    )
    yield from start_stack("fencing", env, tmp, workers=0)


@pytest.fixture(scope="module")
def team(rel_stack: Stack) -> dict[str, str]:
    return rel_stack.new_team("fencing")[1]


@pytest.fixture(scope="module")
def slow(
    rel_stack: Stack, team: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """The slow MLP of test_reliability (its static int8 step takes several seconds), uploaded
    and inspected by a worker that is then stopped."""
    return rel_stack.upload_ready(slow_mlp(tmp_path_factory.mktemp("fence-slow")), team)


@pytest.fixture(autouse=True)
def _no_workers_left(rel_stack: Stack) -> Iterator[None]:
    yield
    for worker in rel_stack.workers:  # none stays frozen
        if worker.poll() is None:
            _signal_tree(worker, signal.SIGCONT)
    rel_stack.stop_workers()


def _tree(worker: subprocess.Popen[bytes]) -> list[int]:
    """The worker's process and all its descendants (the sandbox child has its own session)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))) is not None:
            children.setdefault(stat[1], []).append(int(entry.name))
    found, todo = [], [worker.pid]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _signal_tree(worker: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    for pid in _tree(worker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _owner(stack: Stack, job_id: str) -> subprocess.Popen[bytes]:
    """The worker whose pool process holds the job's lease."""
    with session_scope(stack.settings.database_url) as session:
        owner = session.scalar(select(Job.lease_owner).where(Job.id == job_id))
    assert owner is not None
    pid = int(owner.rsplit(":", 1)[1])
    return next(w for w in stack.workers if pid in _tree(w))


def _written(stack: Stack, job_id: str) -> tuple[Any, ...]:
    """What attempts write for the job: its steps, events and artifacts rows."""
    with session_scope(stack.settings.database_url) as session:
        steps = session.execute(
            select(JobStep.index, JobStep.status, JobStep.artifact_id, JobStep.updated_at)
            .where(JobStep.job_id == job_id)
            .order_by(JobStep.index)
        ).all()
        event_ids = session.scalars(select(JobEvent.id).where(JobEvent.job_id == job_id)).all()
        artifacts = session.execute(
            select(Artifact.id, Artifact.blob_key).where(Artifact.job_id == job_id)
        ).all()
        return tuple(steps), tuple(event_ids), tuple(sorted(artifacts))


def _step_runs(stack: Stack, team: dict[str, str], job_id: str) -> list[int]:
    return [
        e["data"]["index"]
        for e in events(stack, team, job_id)
        if e["event"] == "step" and e["data"]["status"] == "running"
    ]


def _two_step_job(stack: Stack, team: dict[str, str], slow: dict[str, str]) -> str:
    """A prune-then-quantize job, running its second step (the first one's checkpoint stored)."""
    job_id = submit(stack, team, slow, pipeline=TWO_STEPS, evaluation=BELOW_FLOOR_OK)
    wait_for(
        lambda: job(stack, team, job_id)["steps"][1]["status"] == "running",
        timeout=90,
        interval=0.1,
    )
    return job_id


def test_a_frozen_attempt_resumed_after_a_newer_claim_writes_nothing_and_deletes_nothing(
    rel_stack: Stack, team: dict[str, str], slow: dict[str, str]
) -> None:
    rel_stack.start_worker()
    rel_stack.start_worker()
    job_id = _two_step_job(rel_stack, team, slow)
    first = job(rel_stack, team, job_id)
    checkpoint = first["steps"][0]["artifact_id"]
    assert checkpoint and first["attempts"] == 1
    a = _owner(rel_stack, job_id)
    b = next(w for w in rel_stack.workers if w is not a)
    _signal_tree(a, signal.SIGSTOP)  # A freezes mid-step 2, lease and all
    try:
        # A's lease runs out, the reconciler re-queues the job and B claims it with token 2,
        # resuming at step 2 from A's step-1 checkpoint.
        wait_for(
            lambda: (
                (body := job(rel_stack, team, job_id))["attempts"] == 2
                and body["steps"][1]["status"] == "running"
            ),
            timeout=60,
            interval=0.1,
        )
        assert _owner(rel_stack, job_id) is b
        _signal_tree(b, signal.SIGSTOP)  # hold B still, so that any write from now is A's
        before = _written(rel_stack, job_id)
    finally:
        _signal_tree(a, signal.SIGCONT)
    try:
        wait_for(
            lambda: (
                f"job {job_id}: canceled or lease lost; abandoning attempt 1"
                in worker_log_text(rel_stack)
            ),
            timeout=LEASE_S / 2,
            interval=0.1,
        )
        time.sleep(0.5)  # anything A still had to write would have landed by now
        assert _written(rel_stack, job_id) == before  # no step, event or artifact row from A
    finally:
        _signal_tree(b, signal.SIGCONT)
    storage = get_blob_store(rel_stack.settings)
    with session_scope(rel_stack.settings.database_url) as session:
        kept = session.get(Artifact, checkpoint)
        assert kept is not None and storage.exists(kept.blob_key)  # B's resume point intact

    done = rel_stack.wait_job(job_id, team, timeout=120)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2  # B finished; no third attempt
    assert done["steps"][0]["artifact_id"] == checkpoint
    assert _step_runs(rel_stack, team, job_id) == [0, 1, 1]
    assert len(done_events(rel_stack, team, job_id)) == 1


def test_a_two_second_postgres_restart_costs_no_attempt(
    rel_stack: Stack, team: dict[str, str], slow: dict[str, str], fence_postgres: PostgresCluster
) -> None:
    rel_stack.start_worker()
    job_id = submit(rel_stack, team, slow)
    wait_running(rel_stack, team, job_id)
    fence_postgres.stop()  # this module's own cluster
    try:
        time.sleep(2)
    finally:
        fence_postgres.start()
    done = rel_stack.wait_job(job_id, team, timeout=120)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 1
    assert len(done_events(rel_stack, team, job_id)) == 1
    log = worker_log_text(rel_stack)
    assert f"job {job_id} attempt 1: heartbeat: database unreachable" in log  # it was tested


def test_retry_after_cancel_resumes_from_the_stored_checkpoint(
    rel_stack: Stack, team: dict[str, str], slow: dict[str, str]
) -> None:
    rel_stack.start_worker()
    job_id = _two_step_job(rel_stack, team, slow)
    step0 = job(rel_stack, team, job_id)["steps"][0]
    resp = rel_stack.client.post(f"/v1/jobs/{job_id}/cancel", headers=team)
    assert resp.status_code == 200 and resp.json()["status"] == "canceled"
    wait_for(
        lambda: (
            f"job {job_id}: canceled or lease lost; abandoning attempt 1"
            in worker_log_text(rel_stack)
        ),
        timeout=30,
        interval=0.1,
    )
    canceled = job(rel_stack, team, job_id)
    assert canceled["steps"][0]["artifact_id"] == step0["artifact_id"]
    assert [a["id"] for a in canceled["artifacts"]] == [step0["artifact_id"]]
    with session_scope(rel_stack.settings.database_url) as session:
        artifact = session.get(Artifact, step0["artifact_id"])
        assert artifact is not None
        assert get_blob_store(rel_stack.settings).exists(artifact.blob_key)

    resp = rel_stack.client.post(f"/v1/jobs/{job_id}/retry", headers=team)
    assert resp.status_code == 202, resp.text
    done = rel_stack.wait_job(job_id, team, timeout=120)
    assert done["status"] == "succeeded", done["error"]
    assert done["steps"][0]["started_at"] == step0["started_at"]  # step 1 was not run again
    assert done["steps"][0]["artifact_id"] == step0["artifact_id"]
    assert _step_runs(rel_stack, team, job_id) == [0, 1, 1]
    retried = [e for e in events(rel_stack, team, job_id) if e["data"].get("reason") == "retry"]
    assert [e["data"]["resume_from"] for e in retried] == [1]
