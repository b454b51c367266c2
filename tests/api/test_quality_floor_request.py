"""evaluation.floor and allow_below_floor on POST /v1/jobs: an unknown floor key or an impossible
value is a 422 naming the key and the valid ones; a good floor is kept on the job as sent."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Stack, problem


@pytest.mark.parametrize(
    "floor, key, text",
    [
        ({"top1_agreement": 0.9}, "top1_agreement", "valid keys: accuracy_drop, agreement_top1"),
        ({"agreement_top1": 97}, "agreement_top1", "fraction in [0, 1]"),
        ({"cosine_similarity": 0.9, "psnr": 30}, "psnr", "sqnr_db_min"),
    ],
)
def test_a_bad_floor_is_a_422_naming_the_key(
    api_stack: Stack,
    api_team: dict[str, str],
    api_digits: dict[str, dict[str, Any]],
    floor: dict[str, Any],
    key: str,
    text: str,
) -> None:
    resp = api_stack.client.post(
        "/v1/jobs",
        json={
            "model_id": api_digits["onnx"]["id"],
            "pipeline": [{"op": "quantize"}],
            "evaluation": {"floor": floor},
        },
        headers=api_team,
    )
    body = problem(resp, 422, "invalid_floor")
    assert body["field"] == f"evaluation.floor.{key}"
    assert repr(key) in body["detail"] and text in body["detail"]
    assert body["valid_keys"] == [
        "accuracy_drop",
        "agreement_top1",
        "cosine_similarity",
        "sqnr_db",
        "sqnr_db_min",
    ]


def test_a_floor_and_allow_below_floor_are_kept_on_the_job(
    api_stack: Stack, api_team: dict[str, str], api_digits: dict[str, dict[str, Any]]
) -> None:
    evaluation = {
        "task": "generic",
        "floor": {"sqnr_db": 25.0, "sqnr_db_min": None},
        "allow_below_floor": True,
    }
    resp = api_stack.client.post(
        "/v1/jobs",
        json={
            "model_id": api_digits["onnx"]["id"],
            "pipeline": [{"op": "quantize"}],
            "evaluation": evaluation,
        },
        headers=api_team,
    )
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert {k: job["evaluation"][k] for k in evaluation} == evaluation
    assert job["quality"] is None  # not measured yet
    canceled = api_stack.client.post(f"/v1/jobs/{job['id']}/cancel", headers=api_team)
    assert canceled.status_code == 200, canceled.text
