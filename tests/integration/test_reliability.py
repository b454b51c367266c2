"""Jobs are never lost, never finalized twice, never stuck: a Redis server, a Postgres cluster
and workers of this module's own, which the tests flush, kill and restart. Nothing here touches
the machine's services or looks at processes the tests did not start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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


@pytest.fixture(scope="module")
def rel_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """This module's own Redis: the tests flush it, shut it down and start it again."""
    with RedisServer.running(tmp_path_factory.mktemp("rel-redis")) as server:
        yield server


@pytest.fixture(scope="module")
def rel_postgres() -> Iterator[PostgresCluster]:
    """This module's own Postgres cluster (initdb in a temp dir): a test stops and starts it."""
    with PostgresCluster.running() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def rel_stack(
    tmp_path_factory: pytest.TempPathFactory, rel_redis: RedisServer, rel_postgres: PostgresCluster
) -> Iterator[Stack]:
    """Tight leases and a fast reconciler, so recovery shows within seconds; no worker yet."""
    tmp = tmp_path_factory.mktemp("rel-stack")
    env = chaos_env(tmp, rel_postgres.create_database(), rel_redis.url, "rel")
    yield from start_stack("reliability", env, tmp, workers=0)


@pytest.fixture(scope="module")
def slow_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An MLP 64-1024-1024-10 (4.5 MB): its static int8 job takes several seconds."""
    return slow_mlp(tmp_path_factory.mktemp("slow"))


@pytest.fixture(scope="module")
def team(rel_stack: Stack) -> dict[str, str]:
    return rel_stack.new_team("reliability")[1]


@pytest.fixture(scope="module")
def slow(rel_stack: Stack, team: dict[str, str], slow_files: dict[str, Path]) -> dict[str, str]:
    return rel_stack.upload_ready(slow_files, team)


@pytest.fixture(autouse=True)
def _no_workers_left(rel_stack: Stack) -> Iterator[None]:
    yield
    rel_stack.stop_workers()


def submit(stack: Stack, team: dict[str, str], slow: dict[str, str], **extra: Any) -> str:
    body = {**slow, "pipeline": SLOW_STEP, "evaluation": {"task": "generic"}, **extra}
    resp = stack.client.post("/v1/jobs", json=body, headers=team)
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def job(stack: Stack, team: dict[str, str], job_id: str) -> dict[str, Any]:
    return dict(stack.client.get(f"/v1/jobs/{job_id}", headers=team).json())


def events(
    stack: Stack, team: dict[str, str], job_id: str, last: int | None = None
) -> list[dict[str, Any]]:
    headers = {**team, **({"Last-Event-ID": str(last)} if last is not None else {})}
    out: list[dict[str, Any]] = []
    with stack.client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        current: dict[str, Any] = {}
        for line in resp.iter_lines():
            if line.startswith("id: "):
                current["id"] = int(line[4:])
            elif line.startswith("event: "):
                current["event"] = line[7:]
            elif line.startswith("data: "):
                current["data"] = json.loads(line[6:])
            elif line == "" and current:
                out.append(current)
                current = {}
    return out


def wait_running(
    stack: Stack,
    team: dict[str, str],
    job_id: str,
    step_started: bool = True,
    timeout: float = 60,
) -> None:
    def running() -> bool:
        body = job(stack, team, job_id)
        return body["status"] == "running" and (
            not step_started or body["steps"][0]["status"] == "running"
        )

    wait_for(running, timeout=timeout, interval=0.1)


Proc = tuple[int, int]  # pid and start time: a pid the kernel hands out again is not a match


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """State, parent pid and start time of a process, or None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the name in parentheses may hold spaces
    return fields[0], int(fields[1]), int(fields[19])


def sandbox_procs(stack: Stack) -> set[Proc]:
    """The sandbox children descended from the live workers this stack started, and no others."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))) is not None:
            children.setdefault(stat[1], []).append(int(entry.name))
    found: set[Proc] = set()
    todo = [w.pid for w in stack.workers if w.poll() is None]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        stat = proc_stat(pid)
        if b"worker.sandbox" in cmd and stat is not None and stat[0] != "Z":
            found.add((pid, stat[2]))
    return found


def alive(procs: set[Proc]) -> set[Proc]:
    """Those of `procs` still running: not gone, not a zombie, not a reused pid."""
    return {
        (pid, start)
        for pid, start in procs
        if (stat := proc_stat(pid)) is not None and stat[0] != "Z" and stat[2] == start
    }


def worker_log_text(stack: Stack) -> str:
    return "\n".join(p.read_text() for p in stack.worker_log.parent.glob("worker-*.log"))


def done_events(stack: Stack, team: dict[str, str], job_id: str) -> list[dict[str, Any]]:
    return [e for e in events(stack, team, job_id) if e["event"] == "done"]


def blob_files(stack: Stack, job_id: str) -> list[Path]:
    assert stack.settings.blob_dir is not None
    return [p for p in stack.settings.blob_dir.rglob("*") if p.is_file() and job_id in str(p)]


def test_sse_streams_every_transition_in_order_and_resumes(
    rel_stack: Stack, team: dict[str, str], slow: dict[str, str]
) -> None:
    rel_stack.start_worker()
    job_id = submit(rel_stack, team, slow)
    stream = events(rel_stack, team, job_id)  # blocks until the terminal event
    kinds = [(e["event"], e["data"].get("status")) for e in stream]
    assert kinds[0] == ("status", "queued")
    assert kinds[1] == ("status", "running")
    assert ("step", "running") in kinds and ("step", "succeeded") in kinds
    assert kinds.index(("step", "running")) < kinds.index(("step", "succeeded"))
    assert kinds[-2:] == [("status", "succeeded"), ("done", "succeeded")]
    ids = [e["id"] for e in stream]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    progress = [e["data"]["progress"] for e in stream if e["event"] == "progress"]
    assert progress == sorted(progress)
    # A client that reconnects with Last-Event-ID gets exactly what it missed.
    resumed = events(rel_stack, team, job_id, last=ids[2])
    assert [e["id"] for e in resumed] == ids[3:]
    assert job(rel_stack, team, job_id)["status"] == "succeeded"


def test_cancel_kills_the_running_attempt_and_retry_succeeds(
    rel_stack: Stack, team: dict[str, str], slow: dict[str, str]
) -> None:
    rel_stack.start_worker()
    job_id = submit(rel_stack, team, slow)
    wait_running(rel_stack, team, job_id)
    sandboxes = sandbox_procs(rel_stack)
    assert sandboxes
    resp = rel_stack.client.post(f"/v1/jobs/{job_id}/cancel", headers=team)
    assert resp.status_code == 200
    assert resp.json()["status"] == "canceled"
    # The only worker process (concurrency 1) starts the next job only once the canceled
    # attempt has killed its sandbox child, removed its blobs and returned: that is the
    # "stopped" we promise, shown by the order of events rather than by a stopwatch.
    next_id = submit(rel_stack, team, slow)
    wait_running(rel_stack, team, next_id, step_started=False)
    assert not alive(sandboxes)
    assert not blob_files(rel_stack, job_id)
    assert f"job {job_id}: canceled or lease lost; abandoning attempt" in worker_log_text(
        rel_stack
    )  # killed mid-run, not left to finish
    rel_stack.client.post(f"/v1/jobs/{next_id}/cancel", headers=team)
    again = rel_stack.client.post(f"/v1/jobs/{job_id}/cancel", headers=team)
    assert again.status_code == 200  # canceling twice is harmless

    resp = rel_stack.client.post(f"/v1/jobs/{job_id}/retry", headers=team)
    assert resp.status_code == 202, resp.text
    assert resp.json()["status"] == "queued"
    done = rel_stack.wait_job(job_id, team)
    assert done["status"] == "succeeded", done["error"]
    assert len(done_events(rel_stack, team, job_id)) == 2  # canceled, then succeeded
    not_again = rel_stack.client.post(f"/v1/jobs/{job_id}/cancel", headers=team)
    assert not_again.status_code == 409
    assert not_again.json()["code"] == "job_not_cancelable"
    retry = rel_stack.client.post(f"/v1/jobs/{job_id}/retry", headers=team)
    assert retry.status_code == 409 and retry.json()["code"] == "job_not_retryable"


def test_canceling_a_queued_job(
    rel_stack: Stack, team: dict[str, str], slow: dict[str, str]
) -> None:
    job_id = submit(rel_stack, team, slow)  # no worker: stays queued
    resp = rel_stack.client.post(f"/v1/jobs/{job_id}/cancel", headers=team)
    assert resp.json()["status"] == "canceled"
    rel_stack.start_worker()
    # The queue is first in, first out and the worker runs one task at a time: once a job
    # submitted after it has finished, its message was delivered and claimed nothing.
    behind = submit(rel_stack, team, slow, pipeline=[{"op": "quantize", "dtype": "fp16"}])
    assert rel_stack.wait_job(behind, team)["status"] == "succeeded"
    assert job(rel_stack, team, job_id)["status"] == "canceled"


_CLEAN: dict[str, Any] = {}


def _clean_two_steps(stack: Stack, team: dict[str, str], slow: dict[str, str]) -> dict[str, Any]:
    """An uninterrupted TWO_STEPS job, run once for both kill targets (a worker must run)."""
    if not _CLEAN:
        clean_id = submit(stack, team, slow, pipeline=TWO_STEPS, evaluation=BELOW_FLOOR_OK)
        _CLEAN.update(stack.wait_job(clean_id, team, timeout=120))
    assert _CLEAN["status"] == "succeeded", _CLEAN["error"]
    return _CLEAN


@pytest.mark.parametrize("target", ["whole_worker", "pool_child"])
def test_sigkill_mid_job_then_the_job_succeeds_exactly_once(
    rel_stack: Stack, team: dict[str, str], slow: dict[str, str], target: str
) -> None:
    worker = rel_stack.start_worker()
    job_id = submit(rel_stack, team, slow)
    wait_running(rel_stack, team, job_id)
    time.sleep(1.5)
    sandboxes = sandbox_procs(rel_stack)
    assert sandboxes
    _kill(worker, target)
    wait_for(lambda: not alive(sandboxes), timeout=10)  # the sandbox dies with its parent
    if target == "whole_worker":
        rel_stack.start_worker()
    done = rel_stack.wait_job(job_id, team, timeout=120)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    assert len(done_events(rel_stack, team, job_id)) == 1
    finals = [a for a in done["artifacts"] if a["role"] == "final"]
    assert len(finals) == 1
    assert len(blob_files(rel_stack, job_id)) == 1  # the dead attempt left nothing behind
    kinds = [(e["event"], e["data"].get("reason")) for e in events(rel_stack, team, job_id)]
    assert ("status", "lease_expired") in kinds


def test_duplicate_delivery_finalizes_once(
    rel_stack: Stack, team: dict[str, str], slow: dict[str, str]
) -> None:
    """Visibility timeout (2 s) far shorter than the job: Redis hands the message to a second
    worker while the first still runs; the second claims nothing."""
    short = {"COMPAAS_BROKER_VISIBILITY_TIMEOUT_S": "2"}
    rel_stack.start_worker(**short)
    rel_stack.start_worker(**short)
    job_id = submit(rel_stack, team, slow)
    done = rel_stack.wait_job(job_id, team, timeout=120)
    assert done["status"] == "succeeded"
    assert done["attempts"] == 1
    assert len(done_events(rel_stack, team, job_id)) == 1
    assert len([a for a in done["artifacts"] if a["role"] == "final"]) == 1


def test_stale_token_cannot_finalize(
    rel_stack: Stack, team: dict[str, str], slow: dict[str, str]
) -> None:
    from datetime import timedelta

    from app.db.base import utcnow
    from app.db.models import JobStatus
    from app.db.repositories import JobRepository
    from app.db.session import session_scope

    job_id = submit(rel_stack, team, slow)
    url = rel_stack.settings.database_url
    with session_scope(url) as session:
        first = JobRepository(session).claim(job_id, "a", utcnow() - timedelta(seconds=1))
    with session_scope(url) as session:
        second = JobRepository(session).claim(job_id, "b", utcnow() + timedelta(seconds=60))
    assert first is not None and second == first + 1
    with session_scope(url) as session:
        assert not JobRepository(session).update_fenced(job_id, first, status=JobStatus.succeeded)
        assert JobRepository(session).update_fenced(job_id, second, progress=0.5)
    rel_stack.client.post(f"/v1/jobs/{job_id}/cancel", headers=team)


def test_flushall_loses_no_job(
    rel_stack: Stack, team: dict[str, str], slow: dict[str, str], rel_redis: RedisServer
) -> None:
    rel_stack.start_worker()
    ids = [submit(rel_stack, team, slow) for _ in range(3)]
    wait_running(rel_stack, team, ids[0])
    rel_redis.client().flushall()  # this module's own server
    for job_id in ids:
        done = rel_stack.wait_job(job_id, team, timeout=180)
        assert done["status"] == "succeeded", done["error"]
        assert len(done_events(rel_stack, team, job_id)) == 1


def test_redis_down_jobs_still_accepted_and_run_after_recovery(
    rel_stack: Stack, team: dict[str, str], slow: dict[str, str], rel_redis: RedisServer
) -> None:
    rel_stack.start_worker()
    running = submit(rel_stack, team, slow)
    wait_running(rel_stack, team, running)
    rel_redis.shutdown()
    try:
        assert not rel_redis.ping()
        ready = rel_stack.client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"] == "ok"
        assert ready.json()["checks"]["broker"].startswith("unavailable")
        job_id = submit(rel_stack, team, slow)  # accepted: the database is the truth
        assert job(rel_stack, team, job_id)["status"] == "queued"
    finally:
        rel_redis.start()  # same port, empty: a restart without persistence
    assert rel_stack.client.get("/readyz").status_code == 200
    for each in (running, job_id):
        done = rel_stack.wait_job(each, team, timeout=180)
        assert done["status"] == "succeeded", done["error"]
        assert len(done_events(rel_stack, team, each)) == 1


def test_postgres_restart_is_a_503_not_a_500_and_work_continues(
    rel_stack: Stack, team: dict[str, str], slow: dict[str, str], rel_postgres: PostgresCluster
) -> None:
    rel_stack.start_worker()
    job_id = submit(rel_stack, team, slow)
    wait_running(rel_stack, team, job_id)
    rel_postgres.stop()  # this module's own cluster
    try:
        for path in ("/v1/jobs", f"/v1/jobs/{job_id}"):
            resp = rel_stack.client.get(path, headers=team)
            assert resp.status_code == 503, resp.text
            assert resp.headers["retry-after"] == "5"
            assert resp.json()["code"] == "database_unavailable"
        ready = rel_stack.client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["database"] != "ok"
    finally:
        rel_postgres.start()
        wait_for(rel_postgres.ready, timeout=30)
    done = rel_stack.wait_job(job_id, team, timeout=180)
    assert done["status"] == "succeeded", done["error"]
    assert len(done_events(rel_stack, team, job_id)) == 1


def test_poison_job_fails_after_max_attempts_and_the_next_job_succeeds(
    rel_stack: Stack, team: dict[str, str], slow: dict[str, str]
) -> None:
    """A job whose worker dies every time (as with the kernel's OOM killer) is given up."""
    job_id = submit(rel_stack, team, slow)
    for attempt in range(1, 4):
        worker = rel_stack.start_worker()
        wait_for(
            lambda a=attempt: job(rel_stack, team, job_id)["attempts"] == a,
            timeout=60,
            interval=0.1,
        )
        wait_running(rel_stack, team, job_id, step_started=False)
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        rel_stack.workers.remove(worker)
    done = rel_stack.wait_job(job_id, team, timeout=60)
    assert done["status"] == "failed"
    assert done["error"]["code"] == "max_attempts_exceeded"
    assert "3 attempts" in done["error"]["detail"]
    rel_stack.start_worker()
    small = submit(rel_stack, team, slow, pipeline=[{"op": "quantize", "dtype": "fp16"}])
    assert rel_stack.wait_job(small, team)["status"] == "succeeded"


def test_time_limit_poison_fails_with_the_reason(
    rel_stack: Stack, team: dict[str, str], slow: dict[str, str]
) -> None:
    rel_stack.start_worker(COMPAAS_JOB_TIME_LIMIT_S="2")
    job_id = submit(rel_stack, team, slow)
    done = rel_stack.wait_job(job_id, team, timeout=60)
    assert done["status"] == "failed"
    assert done["error"]["code"] == "time_limit_exceeded"
    assert "COMPAAS_JOB_TIME_LIMIT_S" in done["error"]["detail"]
    assert reconcile_once(rel_stack.settings)["failed"] == 0


TWO_STEPS = [
    {"op": "prune", "granularity": "unstructured", "sparsity": 0.5},
    {"op": "quantize", "mode": "static", "dtype": "int8", "calibration": {"samples": 2000}},
]
# Half the weights of an untrained MLP gone: far under the generic SQNR floor, which is not
# what these tests are about (tests/integration/test_quality_floor_api.py is).
BELOW_FLOOR_OK = {"task": "generic", "allow_below_floor": True}


def _kill(worker: subprocess.Popen[bytes], target: str) -> None:
    """SIGKILL the whole worker (main process and pool) or only its pool child."""
    if target == "whole_worker":
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        return
    children = subprocess.run(
        ["pgrep", "-P", str(worker.pid)], capture_output=True, text=True
    ).stdout.split()
    assert children
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)


_CLEAN: dict[str, Any] = {}


def _clean_two_steps(stack: Stack, team: dict[str, str], slow: dict[str, str]) -> dict[str, Any]:
    """An uninterrupted TWO_STEPS job, run once for both kill targets (a worker must run)."""
    if not _CLEAN:
        clean_id = submit(stack, team, slow, pipeline=TWO_STEPS, evaluation=BELOW_FLOOR_OK)
        _CLEAN.update(stack.wait_job(clean_id, team, timeout=120))
    assert _CLEAN["status"] == "succeeded", _CLEAN["error"]
    return _CLEAN


@pytest.mark.parametrize("target", ["whole_worker", "pool_child"])
def test_killed_multi_step_job_resumes_after_its_last_finished_step(
    rel_stack: Stack, team: dict[str, str], slow: dict[str, str], target: str
) -> None:
    """Kill the worker during step 2: the retry starts at step 2 from step 1's checkpoint, and
    the artifact is byte-identical to an uninterrupted run's."""
    worker = rel_stack.start_worker()
    clean = _clean_two_steps(rel_stack, team, slow)

    job_id = submit(rel_stack, team, slow, pipeline=TWO_STEPS, evaluation=BELOW_FLOOR_OK)
    wait_for(
        lambda: job(rel_stack, team, job_id)["steps"][1]["status"] == "running",
        timeout=90,
        interval=0.1,
    )
    first_attempt = job(rel_stack, team, job_id)
    step0 = first_attempt["steps"][0]
    assert step0["status"] == "succeeded" and step0["artifact_id"]
    _kill(worker, target)
    if target == "whole_worker":
        rel_stack.workers.remove(worker)
        rel_stack.start_worker()
    done = rel_stack.wait_job(job_id, team, timeout=180)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    assert done["steps"][0]["started_at"] == step0["started_at"]  # step 1 was not run again
    assert done["steps"][0]["artifact_id"] == step0["artifact_id"]
    step_runs = [
        e["data"]["index"]
        for e in events(rel_stack, team, job_id)
        if e["event"] == "step" and e["data"]["status"] == "running"
    ]
    assert step_runs == [0, 1, 1]
    assert len(done_events(rel_stack, team, job_id)) == 1
    final = next(a for a in done["artifacts"] if a["role"] == "final")
    clean_final = next(a for a in clean["artifacts"] if a["role"] == "final")
    # The resumed step 1 started from the very same step-0 file, so it builds the same
    # variants; among equally faithful ones the quantizer keeps the fastest on this machine
    # (search.choose_quality), a timing that load can flip. The same pick is the same file.
    chosen = done["steps"][1]["details"]["chosen"]
    if chosen == clean["steps"][1]["details"]["chosen"]:
        assert final["sha256"] == clean_final["sha256"]
    else:
        fidelity = {v["name"]: v["fidelity"] for v in clean["steps"][1]["details"]["variants"]}
        assert chosen in fidelity  # a variant the clean run built too
    assert done["metrics"]["final"]["sparsity"] >= 0.45


def test_memory_poison_fails_with_the_reason_and_the_job_behind_it_succeeds(
    rel_stack: Stack, team: dict[str, str], slow: dict[str, str], digits_files: dict[str, Path]
) -> None:
    rel_stack.start_worker(COMPAAS_JOB_MEMORY_LIMIT_MB="500")
    small = rel_stack.upload("models", digits_files["onnx"], team).json()
    assert rel_stack.wait_model(small["id"], team)["status"] == "ready"
    poison = submit(rel_stack, team, slow)
    behind = rel_stack.client.post(
        "/v1/jobs",
        json={"model_id": small["id"], "pipeline": [{"op": "quantize", "dtype": "fp16"}]},
        headers=team,
    ).json()["id"]
    failed = rel_stack.wait_job(poison, team, timeout=120)
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "memory_limit_exceeded"
    assert "500 MiB" in failed["error"]["detail"]
    assert "COMPAAS_JOB_MEMORY_LIMIT_MB" in failed["error"]["detail"]
    assert rel_stack.wait_job(behind, team)["status"] == "succeeded"
