"""A job whose pipeline, preset overrides, exports or student cannot run is refused when it is
created (422 naming the field), before anything is queued. In process, with no worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import Stack, npz_bytes

GRADUAL = {"kind": "gradual", "steps": 3, "epochs_per_step": 3}


@pytest.fixture(scope="module")
def datasets(
    api_stack: Stack, api_team: dict[str, str], digits_files: dict[str, Path]
) -> dict[str, str]:
    """The digits held-out set with labels, and the same inputs without: dataset ids."""
    labelled = api_stack.upload("datasets", digits_files["npz"], api_team)
    with np.load(digits_files["npz"]) as data:
        x_only = npz_bytes(x=data["x"])
    unlabelled = api_stack.post_file("datasets", "digits_x.npz", x_only, api_team)
    assert labelled.status_code == unlabelled.status_code == 201
    return {"labels": labelled.json()["id"], "none": unlabelled.json()["id"]}


def _submit(stack: Stack, headers: dict[str, str], **body: Any) -> Any:
    return stack.client.post("/v1/jobs", json=body, headers=headers)


def _refused(resp: Any, code: str, field: str) -> dict[str, Any]:
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    problem: dict[str, Any] = resp.json()
    assert problem["code"] == code
    assert problem["field"] == field
    return problem


@pytest.mark.parametrize(
    "model, dataset, pipeline, field, text",
    [
        ("onnx", "labels", [{"op": "fine_tune"}], "pipeline[0]", "upload a torch.export .pt2"),
        ("pt2", None, [{"op": "fine_tune"}], "pipeline[0]", "needs a dataset"),
        ("pt2", "none", [{"op": "fine_tune"}], "pipeline[0]", "`labels` array"),
        (
            "pt2",
            "labels",
            [{"op": "quantize"}, {"op": "prune"}],
            "pipeline[1]",
            "Make quantize the last step",
        ),
        (
            "pt2",
            "labels",
            [{"op": "quantize"}, {"op": "quantize", "dtype": "int8"}],
            "pipeline[1]",
            "Stacking quantization on quantization is refused",
        ),
        (
            "pt2",
            "labels",
            [{"op": "prune", "sparsity": 0.5}, {"op": "quantize"}, {"op": "distill"}],
            "pipeline[2]",
            "Make quantize the last step",
        ),
        (
            "pt2",
            "labels",
            [{"op": "weight_share"}, {"op": "distill"}],
            "pipeline[1].student",
            "produces ONNX only",
        ),
    ],
)
def test_pipelines_that_cannot_run_are_refused_before_anything_runs(
    api_stack: Stack,
    api_team: dict[str, str],
    api_digits: dict[str, dict[str, Any]],
    datasets: dict[str, str],
    model: str,
    dataset: str | None,
    pipeline: list[dict[str, Any]],
    field: str,
    text: str,
) -> None:
    body: dict[str, Any] = {"model_id": api_digits[model]["id"], "pipeline": pipeline}
    if dataset is not None:
        body["dataset_id"] = datasets[dataset]
    problem = _refused(_submit(api_stack, api_team, **body), "invalid_pipeline", field)
    assert text in problem["detail"]


@pytest.mark.parametrize(
    "step, field, text",
    [
        ({"granularity": "channels"}, "pipeline[0].granularity", "upload a torch.export .pt2"),
        ({"criterion": "gradient"}, "pipeline[0].criterion", "upload a torch.export .pt2"),
        ({"schedule": GRADUAL}, "pipeline[0].schedule", "upload a torch.export .pt2"),
    ],
)
def test_onnx_upload_asked_for_torch_pruning_gets_422(
    api_stack: Stack,
    api_team: dict[str, str],
    api_digits: dict[str, dict[str, Any]],
    datasets: dict[str, str],
    step: dict[str, Any],
    field: str,
    text: str,
) -> None:
    resp = _submit(
        api_stack,
        api_team,
        model_id=api_digits["onnx"]["id"],
        dataset_id=datasets["labels"],
        pipeline=[{"op": "prune", **step}],
    )
    problem = _refused(resp, "invalid_pipeline", field)
    assert text in problem["detail"]
    assert "unstructured" in problem["detail"]  # says what works on ONNX


def test_preset_with_overrides(
    api_stack: Stack,
    api_team: dict[str, str],
    api_digits: dict[str, dict[str, Any]],
    datasets: dict[str, str],
) -> None:
    model_id, dataset_id = api_digits["pt2"]["id"], datasets["labels"]
    resp = _submit(
        api_stack,
        api_team,
        model_id=model_id,
        dataset_id=dataset_id,
        preset="deep-compression",
        overrides={"prune": {"sparsity": 0.8, "schedule": {"steps": 2}}, "1": {"bits": 6}},
    )
    assert resp.status_code == 202, resp.text
    steps = resp.json()["steps"]
    assert steps[0]["config"]["sparsity"] == 0.8
    assert steps[0]["config"]["schedule"] == {"kind": "gradual", "steps": 2, "epochs_per_step": 10}
    assert steps[1]["config"]["bits"] == 6
    api_stack.client.post(f"/v1/jobs/{resp.json()['id']}/cancel", headers=api_team)
    bad = _submit(
        api_stack,
        api_team,
        model_id=model_id,
        dataset_id=dataset_id,
        preset="tiny",
        overrides={"low_rank": {"energy": 1}},
    )
    assert bad.status_code == 422
    assert bad.json()["field"] == "overrides.low_rank"
    assert "prune" in bad.json()["detail"]  # names the steps that exist


def test_pt2_export_of_a_pipeline_that_ends_on_onnx_is_refused(
    api_stack: Stack,
    api_team: dict[str, str],
    api_digits: dict[str, dict[str, Any]],
    datasets: dict[str, str],
) -> None:
    resp = _submit(
        api_stack,
        api_team,
        model_id=api_digits["pt2"]["id"],
        dataset_id=datasets["labels"],
        pipeline=[{"op": "fine_tune", "epochs": 1}, {"op": "quantize"}],
        export=["onnx", "pt2"],
    )
    problem = _refused(resp, "export_unsupported", "export")
    assert "Request export ['onnx']" in problem["detail"]


def test_distill_student_of_another_team_or_in_onnx_is_refused(
    api_stack: Stack,
    api_team: dict[str, str],
    api_other_team: dict[str, str],
    api_digits: dict[str, dict[str, Any]],
    datasets: dict[str, str],
    digits_files: dict[str, Path],
) -> None:
    """The uploaded-student distillation that runs is in tests/integration/test_pipelines_api."""

    def distill_into(student_id: str) -> Any:
        return _submit(
            api_stack,
            api_team,
            model_id=api_digits["pt2"]["id"],
            dataset_id=datasets["labels"],
            pipeline=[{"op": "distill", "student": "model", "student_model_id": student_id}],
        )

    # another team's model is not found
    stranger = api_stack.upload("models", digits_files["pt2"], api_other_team)
    assert stranger.status_code == 201, stranger.text
    resp = distill_into(stranger.json()["id"])
    assert resp.status_code == 422 and resp.json()["code"] == "student_not_found"
    assert "in your team" in resp.json()["detail"]
    # an ONNX student is refused
    resp = distill_into(api_digits["onnx"]["id"])
    assert resp.status_code == 422 and resp.json()["code"] == "student_invalid"
