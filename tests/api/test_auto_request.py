"""POST /v1/jobs with preset "auto" (issue #17): a bad budget, objective or search is a 422
naming the field and what to send; a good request is one `auto` step on the job, queued."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Stack, problem


@pytest.mark.parametrize(
    "extra, code, field, text",
    [
        ({"budget": {"max_drop": 0.01}}, "invalid_budget", "budget.max_drop", "max_accuracy_drop"),
        ({"budget": {}}, "invalid_budget", "budget", "at least one"),
        ({}, "invalid_budget", "budget", "needs a 'budget'"),
        (
            {"budget": {"min_cosine": 0.99}, "objective": "cheapest"},
            "invalid_objective",
            "objective",
            "size, latency, balanced",
        ),
        (
            {"budget": {"min_cosine": 0.99}, "search": {"max_minutes": 0}},
            "invalid_search",
            "search.max_minutes",
            "max_minutes",
        ),
        (
            {"budget": {"min_cosine": 0.99}, "search": {"minutes": 3}},
            "invalid_search",
            "search.minutes",
            "max_candidates",
        ),
    ],
)
def test_a_bad_auto_request_is_a_422_naming_the_field(
    api_stack: Stack,
    api_team: dict[str, str],
    api_digits: dict[str, dict[str, Any]],
    extra: dict[str, Any],
    code: str,
    field: str,
    text: str,
) -> None:
    resp = api_stack.client.post(
        "/v1/jobs",
        json={"model_id": api_digits["onnx"]["id"], "preset": "auto", **extra},
        headers=api_team,
    )
    body = problem(resp, 422, code)
    assert body["field"] == field
    assert text in body["detail"]
    if code == "invalid_budget" and field != "budget":
        assert body["valid_keys"] == [
            "max_accuracy_drop",
            "min_cosine",
            "min_sqnr_db",
            "max_size_bytes",
            "max_latency_ms",
        ]


def test_budget_without_preset_auto_and_overrides_with_it_are_refused(
    api_stack: Stack, api_team: dict[str, str], api_digits: dict[str, dict[str, Any]]
) -> None:
    model = api_digits["onnx"]["id"]
    resp = api_stack.client.post(
        "/v1/jobs",
        json={"model_id": model, "preset": "fp16", "budget": {"min_cosine": 0.99}},
        headers=api_team,
    )
    body = problem(resp, 422, "validation_error")
    assert body["field"] == "budget" and "preset" in body["detail"]
    resp = api_stack.client.post(
        "/v1/jobs",
        json={
            "model_id": model,
            "preset": "auto",
            "budget": {"min_cosine": 0.99},
            "overrides": {"quantize": {"dtype": "int4"}},
        },
        headers=api_team,
    )
    assert problem(resp, 422, "validation_error")["field"] == "overrides"


def test_accuracy_budget_needs_labels(
    api_stack: Stack, api_team: dict[str, str], api_digits: dict[str, dict[str, Any]]
) -> None:
    resp = api_stack.client.post(
        "/v1/jobs",
        json={
            "model_id": api_digits["onnx"]["id"],
            "preset": "auto",
            "budget": {"max_accuracy_drop": 0.01},
        },
        headers=api_team,
    )
    body = problem(resp, 422, "invalid_pipeline")
    assert "labelled dataset" in body["detail"]


def test_an_auto_job_is_one_auto_step(
    api_stack: Stack, api_team: dict[str, str], api_digits: dict[str, dict[str, Any]]
) -> None:
    resp = api_stack.client.post(
        "/v1/jobs",
        json={
            "model_id": api_digits["onnx"]["id"],
            "preset": "auto",
            "budget": {"min_cosine": 0.99, "max_size_bytes": 200_000},
            "objective": "latency",
            "search": {"max_candidates": 3},
        },
        headers=api_team,
    )
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["preset"] == "auto"
    (step,) = job["steps"]
    assert step["op"] == "auto"
    assert step["config"]["budget"]["min_cosine"] == 0.99
    assert step["config"]["objective"] == "latency"
    assert step["config"]["search"] == {"max_minutes": 15.0, "max_candidates": 3}
    presets = api_stack.client.get("/v1/presets", headers=api_team).json()["items"]
    auto = next(p for p in presets if p["name"] == "auto")
    assert auto["example"]["budget"] == {"max_accuracy_drop": 0.01}
    api_stack.client.post(f"/v1/jobs/{job['id']}/cancel", headers=api_team)
