"""Issue #17: an auto search whose worker is SIGKILLed mid-way resumes on a new worker without
building its finished candidates again; the job's events say "candidate N reused"."""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from app.db.repositories.events import JobEventRepository
from app.db.session import session_scope
from tests.integration.conftest import PG_ADMIN_URL, Stack, chaos_env, start_stack, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def auto_stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Stack]:
    """Tight leases and a reconciler every second (the chaos settings) on a database and a
    queue of this module's own; workers are started by the test."""
    name = f"compaas_auto_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    tmp = tmp_path_factory.mktemp("auto-stack")
    env = chaos_env(tmp, f"{base}/{name}", redis_url, "auto")
    try:
        yield from start_stack("auto", env, tmp, workers=0)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _candidates(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    with session_scope(stack.settings.database_url) as session:
        return JobEventRepository(session).of_type(job_id, "candidate")


def _events(stack: Stack, headers: dict[str, str], job_id: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with stack.client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as resp:
        assert resp.status_code == 200
        current: dict[str, Any] = {}
        for line in resp.iter_lines():
            if line.startswith("event: "):
                current["event"] = line[7:]
            elif line.startswith("data: "):
                current["data"] = json.loads(line[6:])
            elif line == "" and current:
                out.append(current)
                current = {}
    return out


def test_killed_search_resumes_without_repeating_finished_candidates(
    auto_stack: Stack, digits_files: dict[str, Path]
) -> None:
    _, headers = auto_stack.new_team("auto-resume")
    ids = auto_stack.upload_ready({"onnx": digits_files["onnx"], "npz": digits_files["npz"]},
                                  headers)  # fmt: skip
    worker = auto_stack.start_worker()
    # min_sqnr_db 60 dB: no quick build meets it, so no candidate is skipped as dominated and
    # the search builds one after another up to the limit.
    resp = auto_stack.client.post(
        "/v1/jobs",
        json={
            **ids,
            "preset": "auto",
            "budget": {"min_sqnr_db": 60.0},
            "search": {"max_candidates": 4},
        },
        headers=headers,
    )
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    wait_for(
        lambda: sum(c["status"] == "measured" for c in _candidates(auto_stack, job_id)) >= 2,
        timeout=240,
        interval=0.2,
    )
    os.killpg(worker.pid, signal.SIGKILL)  # the whole worker, its sandboxed child included
    worker.wait()
    auto_stack.workers.remove(worker)
    first = {c["key"] for c in _candidates(auto_stack, job_id) if c["status"] == "measured"}
    assert len(first) >= 2
    auto_stack.start_worker()
    done = auto_stack.wait_job(job_id, headers, timeout=300)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    records = _candidates(auto_stack, job_id)
    built = [c["key"] for c in records if c["status"] == "measured" and not c["reused"]]
    assert len(built) == len(set(built))  # no candidate was built twice
    reused = {c["key"] for c in records if c.get("reused")}
    assert reused == first
    messages = [
        e["data"]["message"]
        for e in _events(auto_stack, headers, job_id)
        if e["event"] == "log" and "reused" in e["data"].get("message", "")
    ]
    assert len(messages) == len(first)
    assert all(m.startswith("candidate ") and " reused (" in m for m in messages)
    details = done["steps"][0]["details"]
    assert details["search"]["reused"] == len(first)
    assert len([c for c in details["candidates"] if c["status"] != "skipped"]) == 4
