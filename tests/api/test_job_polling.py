"""Polling a job: ETag and If-None-Match (304), the ?view=status document, team scoping.

On the embedded default (SQLite, `api_stack`) and on a throwaway Postgres database, both served
in this process with no worker: the job is a real row and changes the way a worker changes it
(JobRepository: claim, step and progress writes, artifacts), or through the API (cancel).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.db.models import JobStatus
from app.db.repositories import JobRepository, TeamJobRepository
from app.db.session import session_scope
from tests.conftest import Stack, embedded_env, problem, start_stack

STATUS_FIELDS = {"id", "status", "progress", "current_step", "updated_at"}


@pytest.fixture(scope="module")
def pg_api_stack(postgres_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The API in this process on a throwaway Postgres database; no worker, no reconciler."""
    tmp = tmp_path_factory.mktemp("pg-api")
    env = {
        **embedded_env(tmp),
        "COMPAAS_DATABASE_URL": postgres_db,
        "COMPAAS_RUN_RECONCILER": "false",
    }
    yield from start_stack("pg-api", env, tmp, workers=0)


@pytest.fixture(params=["sqlite", "postgres"])
def polled(request: pytest.FixtureRequest) -> Stack:
    name = {"sqlite": "api_stack", "postgres": "pg_api_stack"}[request.param]
    return request.getfixturevalue(name)


def new_job(stack: Stack, team_id: str, steps: int = 2) -> str:
    """A queued job row of the team with `steps` pending steps, as POST /v1/jobs records one."""
    with session_scope(stack.settings.database_url) as session:
        jobs = TeamJobRepository(session, team_id)
        job = jobs.create(
            model_id=None, status=JobStatus.queued, evaluation={"task": "generic"}, export=["onnx"]
        )
        for index in range(steps):
            jobs.add_step(job.id, index, "quantize", {"op": "quantize"})
        return job.id


def worker_writes(stack: Stack, write: Any) -> None:
    with session_scope(stack.settings.database_url) as session:
        write(JobRepository(session))


def get(stack: Stack, job_id: str, headers: dict[str, str], tag: str | None = None, **params: str):
    extra = {"If-None-Match": tag} if tag is not None else {}
    return stack.client.get(f"/v1/jobs/{job_id}", params=params, headers={**headers, **extra})


def test_etag_and_not_modified(polled: Stack) -> None:
    team_id, headers = polled.new_team("etag")
    job_id = new_job(polled, team_id)
    first = get(polled, job_id, headers)
    assert first.status_code == 200, first.text
    assert first.json()["id"] == job_id and len(first.json()["steps"]) == 2
    tag = first.headers["etag"]
    assert tag.startswith('"') and tag.endswith('"') and not tag.startswith("W/")
    assert first.headers["cache-control"] == "private, no-cache"
    assert first.headers["content-type"] == "application/json"

    again = get(polled, job_id, headers)
    assert again.headers["etag"] == tag and again.content == first.content
    for sent in (tag, f"W/{tag}", f'"other", {tag}', "*"):
        resp = get(polled, job_id, headers, sent)
        assert resp.status_code == 304, sent
        assert resp.content == b""
        assert resp.headers["etag"] == tag
        assert resp.headers["cache-control"] == "private, no-cache"
    assert get(polled, job_id, headers, '"not-this-one"').status_code == 200


def test_etag_changes_with_every_part_of_the_document(polled: Stack) -> None:
    team_id, headers = polled.new_team("etag-changes")
    job_id = new_job(polled, team_id)
    seen = [get(polled, job_id, headers).headers["etag"]]

    def changed_to(expect: Any) -> dict[str, Any]:
        old = seen[-1]
        resp = get(polled, job_id, headers, old)
        assert resp.status_code == 200, "the job changed, so the old tag must not match"
        body = resp.json()
        assert expect(body), body
        assert resp.headers["etag"] not in seen
        seen.append(resp.headers["etag"])
        assert get(polled, job_id, headers, seen[-1]).status_code == 304
        return body

    # A worker claims it (the job row), runs step 0 (only the step row), stores its checkpoint
    # (an artifact, then the step's artifact_id), and reports progress.
    token = {"value": 0}

    def claim(jobs: JobRepository) -> None:
        from datetime import timedelta

        from app.db.base import utcnow

        token["value"] = jobs.claim(job_id, "test-worker", utcnow() + timedelta(seconds=30)) or 0

    worker_writes(polled, claim)
    changed_to(lambda b: b["status"] == "running" and b["attempts"] == 1)
    worker_writes(polled, lambda jobs: jobs.update_step(job_id, 0, status="running"))
    changed_to(lambda b: b["steps"][0]["status"] == "running")

    artifact_id: dict[str, str] = {}

    def checkpoint(jobs: JobRepository) -> None:
        artifact = jobs.add_artifact(
            team_id=team_id,
            job_id=job_id,
            step_index=0,
            role="checkpoint",
            format="onnx",
            blob_key=f"jobs/{job_id}/step-0.onnx",
            size_bytes=10,
            sha256="0" * 64,
        )
        artifact_id["id"] = artifact.id

    worker_writes(polled, checkpoint)
    changed_to(lambda b: [a["id"] for a in b["artifacts"]] == [artifact_id["id"]])
    worker_writes(
        polled,
        lambda jobs: jobs.update_step(job_id, 0, status="succeeded", artifact_id=artifact_id["id"]),
    )
    changed_to(lambda b: b["steps"][0]["artifact_id"] == artifact_id["id"])
    worker_writes(polled, lambda jobs: jobs.update_fenced(job_id, token["value"], progress=0.5))
    changed_to(lambda b: b["progress"] == 0.5)

    # Through the API: cancel (the job row, its steps, its checkpoints deleted).
    assert polled.client.post(f"/v1/jobs/{job_id}/cancel", headers=headers).status_code == 200
    changed_to(lambda b: b["status"] == "canceled")


def test_another_teams_job_is_404_with_or_without_a_tag(polled: Stack) -> None:
    team_id, headers = polled.new_team("owner")
    _, other = polled.new_team("stranger")
    job_id = new_job(polled, team_id)
    tag = get(polled, job_id, headers).headers["etag"]
    status_tag = get(polled, job_id, headers, view="status").headers["etag"]
    problem(get(polled, job_id, other), 404, "not_found")
    problem(get(polled, job_id, other, tag), 404, "not_found")
    problem(get(polled, job_id, other, "*"), 404, "not_found")
    problem(get(polled, job_id, other, status_tag, view="status"), 404, "not_found")
    problem(get(polled, str(uuid.uuid4()), headers, "*"), 404, "not_found")


def test_status_view(polled: Stack) -> None:
    team_id, headers = polled.new_team("status-view")
    job_id = new_job(polled, team_id, steps=3)
    full = get(polled, job_id, headers).json()
    resp = get(polled, job_id, headers, view="status")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == STATUS_FIELDS
    assert body["id"] == job_id
    assert (body["status"], body["progress"], body["current_step"]) == ("queued", 0.0, None)
    assert body["updated_at"]
    assert {k: full[k] for k in ("status", "progress", "current_step")} == {
        k: body[k] for k in ("status", "progress", "current_step")
    }
    tag = resp.headers["etag"]
    assert tag != get(polled, job_id, headers).headers["etag"], "one tag per representation"
    assert get(polled, job_id, headers, tag, view="status").status_code == 304

    def progress(jobs: JobRepository) -> None:
        from datetime import timedelta

        from app.db.base import utcnow

        token = jobs.claim(job_id, "test-worker", utcnow() + timedelta(seconds=30))
        assert token is not None
        jobs.update_fenced(job_id, token, progress=1 / 3, current_step=1)

    worker_writes(polled, progress)
    moved = get(polled, job_id, headers, tag, view="status")
    assert moved.status_code == 200
    assert moved.json()["status"] == "running"
    assert (moved.json()["progress"], moved.json()["current_step"]) == (1 / 3, 1)
    assert moved.json()["updated_at"] > body["updated_at"]
    assert moved.headers["etag"] != tag
    problem(get(polled, job_id, headers, view="everything"), 422, "validation_error")


def test_openapi_documents_the_views_and_the_304(api_stack: Stack, tmp_path: Path) -> None:
    spec = api_stack.client.get("/openapi.json").json()
    op = spec["paths"]["/v1/jobs/{job_id}"]["get"]
    params = {p["name"]: p for p in op["parameters"]}
    assert params["view"]["in"] == "query"
    assert set(params["view"]["schema"]["enum"]) == {"full", "status"}
    assert params["If-None-Match"]["in"] == "header"
    assert "304" in op["responses"] and "ETag" in op["responses"]["200"]["headers"]
    shapes = str(op["responses"]["200"]["content"]["application/json"]["schema"])
    assert "JobRead" in shapes and "JobStatusRead" in shapes
    status_schema = spec["components"]["schemas"]["JobStatusRead"]
    assert set(status_schema["properties"]) == STATUS_FIELDS
