"""Issue #14 (verdict and floor) through the REST API and a real worker: a pipeline that wrecks
the digits CNN ends `failed` with `quality_below_floor`, its metrics and a downloadable artifact
marked `rejected` kept; with `evaluation.allow_below_floor` it succeeds, `degraded`, warned."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.measured_on import cpu
from tests.integration.conftest import Stack
from tests.integration.methods import Client, load_npz, run_onnx

pytestmark = pytest.mark.integration

# One-shot unstructured 90 % with no recovery: most of the CNN's weights gone at once.
WRECK = [{"op": "prune", "granularity": "unstructured", "sparsity": 0.9}]


@pytest.fixture(scope="module")
def api(pg_stack: Stack) -> Client:
    _, headers = pg_stack.new_team("quality-floor")
    return Client(pg_stack, headers)


def _finish(api: Client, digits_files: dict[str, Path], **evaluation: Any) -> dict[str, Any]:
    resp = api.submit(
        digits_files["onnx"], digits_files["npz"], pipeline=WRECK, evaluation=evaluation
    )
    assert resp.status_code == 202, resp.text
    return api.stack.wait_job(resp.json()["id"], api.headers, timeout=600)


def _sse(stack: Stack, headers: dict[str, str], job_id: str) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    with stack.client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as resp:
        kind = ""
        for line in resp.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                out.append((kind, json.loads(line[6:])))
    return out


def test_wrecked_model_fails_below_the_floor_and_keeps_a_rejected_artifact(
    api: Client, digits_files: dict[str, Path]
) -> None:
    job = _finish(api, digits_files)
    assert job["status"] == "failed"
    error = job["error"]
    assert error["code"] == "quality_below_floor"
    quality = job["quality"]
    assert quality["verdict"] == "rejected"
    assert quality["floor"] == {"agreement_top1": 0.97, "accuracy_drop": 0.02}
    assert "agreement_top1" in quality["below_floor"]
    # the detail names the measured figure and the floor, and how to go on
    agreement = quality["measured"]["agreement_top1"]
    assert agreement < 0.97
    assert f"{agreement:g}" in error["detail"] and "0.97" in error["detail"]
    assert "allow_below_floor" in error["detail"]

    # the metrics stay on the job: original, final, ratios, the step and its verdict
    metrics = job["metrics"]
    assert metrics["final"]["sparsity"] >= 0.85
    assert metrics["final"]["agreement_top1"] == agreement
    assert metrics["ratios"]["accuracy_drop"] == pytest.approx(quality["measured"]["accuracy_drop"])
    (step,) = job["steps"]
    assert step["status"] == "succeeded" and step["quality"] == quality
    on = metrics["final"]["measured_on"]
    assert on == metrics["original"]["measured_on"] == step["metrics"]["measured_on"]
    assert on["dataset_id"] == job["dataset_id"]
    assert on["runtime"] == "onnxruntime" and on["samples"] > 0 and on["batch"] == 1
    assert on["cpu_flags"] == cpu()["flags"]  # read inside the worker's sandbox too

    # the artifact stays downloadable, marked rejected, and it is the model measured
    (art,) = [a for a in job["artifacts"] if a["role"] == "final"]
    assert art["verdict"] == "rejected"
    data = api.artifact(job)
    x = load_npz(digits_files["npz"])["x"][:32]
    assert run_onnx(data, x).shape == (32, 10)

    # the events (SSE) carry the verdict and the error
    events = _sse(api.stack, api.headers, job["id"])
    (final,) = [d for k, d in events if k == "status" and d.get("status") == "failed"]
    assert final["quality"]["verdict"] == "rejected"
    assert final["error"]["code"] == "quality_below_floor"
    (step_event,) = [d for k, d in events if k == "step" and d.get("status") == "succeeded"]
    assert step_event["quality"]["verdict"] == "rejected"


def test_allow_below_floor_succeeds_degraded_with_a_warning(
    api: Client, digits_files: dict[str, Path]
) -> None:
    job = _finish(api, digits_files, allow_below_floor=True)
    assert job["status"] == "succeeded", job["error"]
    quality = job["quality"]
    assert quality["verdict"] == "degraded"
    agreement = quality["measured"]["agreement_top1"]
    assert agreement < 0.97
    (warning,) = [w for w in job["warnings"] if "quality floor" in w]
    assert f"{agreement:g}" in warning and "0.97" in warning
    (art,) = [a for a in job["artifacts"] if a["role"] == "final"]
    assert art["verdict"] == "degraded"


def test_a_lowered_floor_lets_the_same_job_pass(api: Client, digits_files: dict[str, Path]) -> None:
    """The floor is the request's: held to figures this pipeline meets, the job is `ok`."""
    job = _finish(api, digits_files, floor={"agreement_top1": 0.0, "accuracy_drop": None})
    assert job["status"] == "succeeded", job["error"]
    assert job["quality"]["verdict"] == "ok"
    assert job["quality"]["floor"] == {"agreement_top1": 0.0}
    assert not [w for w in job["warnings"] if "quality floor" in w]
    assert np.isfinite(job["metrics"]["final"]["agreement_top1"])
