"""Pre-flight through the REST API: a bad prune config is a 422 naming the field when the job is
created; a training job that cannot fit the worker's time limit fails before any compute, with
the estimate in its error (the worker's own runner and sandbox, run here on the queued job)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from app.storage import get_blob_store
from tests.conftest import Stack
from worker.runner import run_job


@pytest.mark.parametrize(
    "step, field, text",
    [
        ({"sparsity": 1.5}, "pipeline[0].sparsity", "less than 1"),
        ({"granularity": "blocks"}, "pipeline[0].granularity", "channels"),
        ({"schedule": {"kind": "gradual", "steps": 0}}, "pipeline[0].schedule.steps", "1"),
        ({"n": 4, "m": 4}, "pipeline[0]", "n (4) must be smaller than m (4)"),
        ({"head_sparsity": 0.3}, "pipeline[0]", "granularity 'channels'"),
        ({"ratio": 0.5}, "pipeline[0].ratio", "Extra inputs"),
    ],
)
def test_a_bad_prune_config_is_a_422_naming_the_field(
    api_stack: Stack,
    api_team: dict[str, str],
    api_digits: dict[str, dict[str, Any]],
    step: dict[str, Any],
    field: str,
    text: str,
) -> None:
    resp = api_stack.client.post(
        "/v1/jobs",
        json={"model_id": api_digits["pt2"]["id"], "pipeline": [{"op": "prune", **step}]},
        headers=api_team,
    )
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    problem = resp.json()
    assert problem["code"] == "invalid_pipeline"
    assert problem["field"] == field
    assert text in problem["detail"]


def test_a_job_over_the_time_limit_fails_in_preflight_with_its_estimate(
    api_stack: Stack,
    api_team: dict[str, str],
    api_digits: dict[str, dict[str, Any]],
    digits_files: dict[str, Path],
) -> None:
    dataset = api_stack.upload("datasets", digits_files["npz"], api_team)
    assert dataset.status_code == 201, dataset.text
    resp = api_stack.client.post(
        "/v1/jobs",
        json={
            "model_id": api_digits["pt2"]["id"],
            "dataset_id": dataset.json()["id"],
            "pipeline": [{"op": "distill", "epochs": 500, "batch_size": 8}],
        },
        headers=api_team,
    )
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    settings = api_stack.settings.model_copy(update={"job_time_limit_s": 90})
    assert run_job(job_id, settings, get_blob_store(settings)) == "failed"
    job = api_stack.client.get(f"/v1/jobs/{job_id}", headers=api_team).json()
    assert job["status"] == "failed"
    error = job["error"]
    assert error["code"] == "estimated_time_exceeds_limit" and error["field"] == "pipeline"
    assert "× 500 epochs at the measured" in error["detail"]
    assert "time limit of 90 s" in error["detail"]
    assert "COMPAAS_JOB_TIME_LIMIT_S" in error["detail"]
    assert not job["metrics"]  # refused before the original was measured
    started = datetime.fromisoformat(job["started_at"])
    assert (datetime.fromisoformat(job["finished_at"]) - started).total_seconds() < 90
