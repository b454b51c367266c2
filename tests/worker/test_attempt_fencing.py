"""An attempt's writes are fenced by its token, its cleanup removes only what it alone created,
cancel keeps checkpoints and retry resumes from the last valid one. The runner's own code
against the in-process API's SQLite database and blob store (no worker process: the engine's
events are fed to the relay as the sandbox would relay them)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, OperationalError

from app.db.base import utcnow
from app.db.models import Artifact, Job, JobEvent, JobStep
from app.db.session import session_scope
from app.storage import get_blob_store
from engine.events import EventKind
from tests.conftest import Stack
from worker import outage, runner

TWO_STEPS = [
    {"op": "prune", "granularity": "unstructured", "sparsity": 0.3},
    {"op": "quantize", "dtype": "fp16"},
]


def _job(stack: Stack, team: dict[str, str], model_id: str) -> str:
    resp = stack.client.post(
        "/v1/jobs", json={"model_id": model_id, "pipeline": TWO_STEPS}, headers=team
    )
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def _expire_lease(stack: Stack, job_id: str) -> None:
    with session_scope(stack.settings.database_url) as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(1))
        )


def _attempt(stack: Stack, job_id: str) -> tuple[runner._EventRelay, runner._ClaimedJob]:
    """Claim the job as a worker would (the claim's transaction picks the resume point)."""
    storage = get_blob_store(stack.settings)
    claimed = runner._claim(job_id, stack.settings, storage)
    assert claimed is not None
    token, job = claimed
    relay = runner._EventRelay(stack.settings, storage, job_id, job.team_id, token)
    return relay, job


def _checkpoint_event(tmp: Path, index: int, content: bytes) -> dict[str, Any]:
    path = tmp / f"out-{index}-{len(content)}.onnx"
    path.write_bytes(content)
    return {
        "type": EventKind.STEP_FINISHED,
        "index": index,
        "metrics": {"size_bytes": len(content)},
        "quality": {"verdict": "ok"},
        "artifact": {
            "path": str(path),
            "format": "onnx",
            "size_bytes": len(content),
            "sha256": "0" * 64,
        },
    }


def _snapshot(stack: Stack, job_id: str) -> tuple[Any, ...]:
    """Everything an attempt writes for the job: its row's progress, steps, events, artifacts."""
    with session_scope(stack.settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        steps = session.execute(
            select(
                JobStep.index,
                JobStep.status,
                JobStep.started_at,
                JobStep.finished_at,
                JobStep.artifact_id,
                JobStep.updated_at,
            )
            .where(JobStep.job_id == job_id)
            .order_by(JobStep.index)
        ).all()
        event_ids = session.scalars(select(JobEvent.id).where(JobEvent.job_id == job_id)).all()
        artifacts = session.execute(
            select(Artifact.id, Artifact.blob_key).where(Artifact.job_id == job_id)
        ).all()
        return (
            (job.progress, job.current_step, job.lease_token, job.metrics),
            tuple(steps),
            tuple(event_ids),
            tuple(sorted(artifacts)),
        )


@pytest.fixture
def job_id(api_stack: Stack, api_team: dict[str, str], api_digits: dict[str, Any]) -> str:
    return _job(api_stack, api_team, api_digits["onnx"]["id"])


def test_a_stale_attempt_writes_nothing_and_keeps_the_checkpoint_its_successor_resumed_from(
    api_stack: Stack, api_team: dict[str, str], job_id: str, tmp_path: Path
) -> None:
    storage = get_blob_store(api_stack.settings)
    a, _ = _attempt(api_stack, job_id)
    a({"type": EventKind.ORIGINAL_MEASURED, "metrics": {"size_bytes": 100}})
    a({"type": EventKind.STEP_STARTED, "index": 0})
    a(_checkpoint_event(tmp_path, 0, b"step zero by A"))
    assert not a.lost and len(a.uploaded) == 1
    a_step0 = a.uploaded[0]

    _expire_lease(api_stack, job_id)  # A froze past its lease; B claims with the next token
    b, claimed = _attempt(api_stack, job_id)
    assert b.token == a.token + 1
    assert claimed.checkpoint is not None and claimed.checkpoint.start_index == 1
    assert claimed.checkpoint.blob_key == a_step0  # B resumes from A's step-0 checkpoint
    b({"type": EventKind.STEP_STARTED, "index": 1})
    after_claim = _snapshot(api_stack, job_id)

    # A wakes up: every write it tries is refused, and it stops at the first.
    a.last_heartbeat -= 3600
    assert not a.keep_going() and a.lost
    a({"type": EventKind.PROGRESS, "progress": 0.7, "message": "late"})
    a({"type": EventKind.STEP_STARTED, "index": 1})
    a({"type": EventKind.LOG, "level": "info", "message": "late"})
    a(_checkpoint_event(tmp_path, 1, b"late step one by A"))
    assert runner._finalize(a, _result(tmp_path, "late final by A")) == "abandoned"
    runner._fail(a, "boom", "A fails late")
    assert _snapshot(api_stack, job_id) == after_claim
    # A's cleanup removed its own unrecorded final file and kept the checkpoint B resumed from.
    assert storage.exists(a_step0)
    assert not [k for k in a.uploaded if k.endswith("final.onnx") and storage.exists(k)]

    # B finishes from there.
    assert runner._finalize(b, _result(tmp_path, "final by B")) == "succeeded"
    done = api_stack.client.get(f"/v1/jobs/{job_id}", headers=api_team).json()
    assert done["status"] == "succeeded" and done["attempts"] == 2
    roles = sorted(a["role"] for a in done["artifacts"])
    assert roles == ["checkpoint", "final"]


def _result(tmp: Path, content: str) -> dict[str, Any]:
    path = tmp / f"final-{abs(hash(content))}.onnx"
    path.write_text(content)
    art = {"path": str(path), "format": "onnx", "size_bytes": len(content), "sha256": "1" * 64}
    return {
        "artifacts": [art],
        "steps": [{"index": 1, "metrics": {}, "quality": {"verdict": "ok"}}],
        "original": {"size_bytes": 100},
        "final": {"size_bytes": 50},
        "ratios": {"size": 2.0},
        "quality": {"verdict": "ok"},
    }


def test_cancel_keeps_the_checkpoint_and_retry_resumes_from_it(
    api_stack: Stack, api_team: dict[str, str], job_id: str, tmp_path: Path
) -> None:
    storage = get_blob_store(api_stack.settings)
    a, _ = _attempt(api_stack, job_id)
    a({"type": EventKind.ORIGINAL_MEASURED, "metrics": {"size_bytes": 100}})
    a({"type": EventKind.STEP_STARTED, "index": 0})
    a(_checkpoint_event(tmp_path, 0, b"step zero"))
    a({"type": EventKind.STEP_STARTED, "index": 1})
    resp = api_stack.client.post(f"/v1/jobs/{job_id}/cancel", headers=api_team)
    assert resp.status_code == 200 and resp.json()["status"] == "canceled"
    a.last_heartbeat -= 3600  # the next heartbeat is due
    assert not a.keep_going()
    runner._discard_unclaimed(a)  # what the worker does when its attempt is canceled
    canceled = resp.json()
    assert canceled["steps"][0]["status"] == "succeeded" and canceled["steps"][0]["artifact_id"]
    assert canceled["steps"][1]["status"] == "pending"
    assert [x["role"] for x in canceled["artifacts"]] == ["checkpoint"]
    assert storage.exists(a.uploaded[0])

    resp = api_stack.client.post(f"/v1/jobs/{job_id}/retry", headers=api_team)
    assert resp.status_code == 202, resp.text
    assert resp.json()["progress"] == 0.5
    with session_scope(api_stack.settings.database_url) as session:
        last = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc())
        ).first()
        assert last is not None and last.data["reason"] == "retry"
        assert last.data["resume_from"] == 1
    b, claimed = _attempt(api_stack, job_id)
    assert claimed.checkpoint is not None
    assert (claimed.checkpoint.start_index, claimed.checkpoint.blob_key) == (1, a.uploaded[0])
    api_stack.client.post(f"/v1/jobs/{job_id}/cancel", headers=api_team)


def test_a_checkpoint_whose_file_is_gone_is_skipped(
    api_stack: Stack, api_team: dict[str, str], job_id: str, tmp_path: Path
) -> None:
    storage = get_blob_store(api_stack.settings)
    a, _ = _attempt(api_stack, job_id)
    a({"type": EventKind.ORIGINAL_MEASURED, "metrics": {"size_bytes": 100}})
    a(_checkpoint_event(tmp_path, 0, b"step zero"))
    api_stack.client.post(f"/v1/jobs/{job_id}/cancel", headers=api_team)
    storage.delete(a.uploaded[0])
    assert api_stack.client.post(f"/v1/jobs/{job_id}/retry", headers=api_team).status_code == 202
    _, claimed = _attempt(api_stack, job_id)
    assert claimed.checkpoint is None  # starts over at step 0 ...
    body = api_stack.client.get(f"/v1/jobs/{job_id}", headers=api_team).json()
    assert [s["status"] for s in body["steps"]] == ["pending", "pending"]  # ... and says so
    api_stack.client.post(f"/v1/jobs/{job_id}/cancel", headers=api_team)


def test_a_newer_checkpoint_of_a_step_replaces_the_older_one(
    api_stack: Stack, api_team: dict[str, str], job_id: str, tmp_path: Path
) -> None:
    storage = get_blob_store(api_stack.settings)
    a, _ = _attempt(api_stack, job_id)
    a({"type": EventKind.ORIGINAL_MEASURED, "metrics": {"size_bytes": 100}})
    a(_checkpoint_event(tmp_path, 0, b"step zero by A"))
    # The job is retried from scratch (its checkpoint's file went missing), and B redoes step 0.
    api_stack.client.post(f"/v1/jobs/{job_id}/cancel", headers=api_team)
    moved = tmp_path / "aside"
    storage.get_to_path(a.uploaded[0], moved)
    storage.delete(a.uploaded[0])
    api_stack.client.post(f"/v1/jobs/{job_id}/retry", headers=api_team)
    b, _ = _attempt(api_stack, job_id)
    storage.put_file(a.uploaded[0], moved)  # the file is back, but B has started over
    b(_checkpoint_event(tmp_path, 0, b"step zero by B"))
    body = api_stack.client.get(f"/v1/jobs/{job_id}", headers=api_team).json()
    checkpoints = [x for x in body["artifacts"] if x["role"] == "checkpoint"]
    assert len(checkpoints) == 1 and checkpoints[0]["id"] == body["steps"][0]["artifact_id"]
    assert not storage.exists(a.uploaded[0]) and storage.exists(b.uploaded[0])
    api_stack.client.post(f"/v1/jobs/{job_id}/cancel", headers=api_team)


def _operational() -> OperationalError:
    return OperationalError("SELECT 1", {}, Exception("connection refused"))


def test_retry_until_rides_out_database_errors_within_the_deadline() -> None:
    now = [0.0]
    calls: list[int] = []

    def sleep(s: float) -> None:
        now[0] += s

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise _operational()
        return "done"

    assert outage.retry_until(flaky, 10.0, "t", sleep=sleep, clock=lambda: now[0]) == "done"
    assert len(calls) == 4 and now[0] == pytest.approx(0.1 + 0.2 + 0.4)


def test_retry_until_gives_up_at_the_deadline_and_never_retries_a_wrong_statement() -> None:
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    def down() -> None:
        raise _operational()

    with pytest.raises(outage.OutageOutlasted):
        outage.retry_until(down, 5.0, "t", sleep=sleep, clock=lambda: now[0])
    assert now[0] == pytest.approx(5.0)

    calls: list[int] = []

    def wrong() -> None:
        calls.append(1)
        raise IntegrityError("INSERT", {}, Exception("duplicate key"))

    with pytest.raises(IntegrityError):
        outage.retry_until(wrong, 5.0, "t", sleep=sleep, clock=lambda: now[0])
    assert calls == [1]
