"""Idempotency-Key on every create: same key + body replays, same key + other body is a 422."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import Stack, npz_bytes


def _npz(n: int) -> bytes:
    return npz_bytes(x=np.zeros((n, 1, 8, 8), np.float32), labels=np.zeros(n, np.int64))


def _post(stack: Stack, route: str, data: bytes, headers: dict[str, str], key: str) -> Any:
    return stack.client.post(
        f"/v1/{route}",
        files={"file": ("f.npz", io.BytesIO(data))},
        headers={**headers, "Idempotency-Key": key},
    )


@pytest.mark.slow
def test_dataset_upload_replays_and_rejects_a_different_body(api_stack: Stack) -> None:
    _, headers = api_stack.new_team("idem-datasets")
    first = _post(api_stack, "datasets", _npz(4), headers, "k-1")
    assert first.status_code == 201
    again = _post(api_stack, "datasets", _npz(4), headers, "k-1")
    assert again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == first.headers["location"]
    items = api_stack.client.get("/v1/datasets", headers=headers).json()["items"]
    assert [d["id"] for d in items] == [first.json()["id"]]

    other = _post(api_stack, "datasets", _npz(5), headers, "k-1")
    assert other.status_code == 422
    assert other.json()["code"] == "idempotency_key_reused"
    # Keys are per team: another team may use the same key for its own request.
    _, other_team = api_stack.new_team("idem-other")
    assert _post(api_stack, "datasets", _npz(5), other_team, "k-1").status_code == 201


def test_model_upload_and_job_create_replay(
    api_stack: Stack, digits_files: dict[str, Path]
) -> None:
    client = api_stack.client
    _, headers = api_stack.new_team("idem-jobs")
    data = digits_files["onnx"].read_bytes()
    first = _post(api_stack, "models", data, headers, "model-1")
    assert first.status_code == 201
    assert _post(api_stack, "models", data, headers, "model-1").json()["id"] == first.json()["id"]
    model = api_stack.inspect_here(first.json()["id"], headers)
    assert model["status"] == "ready", model

    body = {"model_id": model["id"], "pipeline": [{"op": "quantize", "dtype": "fp16"}]}
    key = {**headers, "Idempotency-Key": "job-1"}
    job = client.post("/v1/jobs", json=body, headers=key)
    assert job.status_code == 202
    client.post(f"/v1/jobs/{job.json()['id']}/cancel", headers=headers)
    replay = client.post("/v1/jobs", json=body, headers=key)
    assert replay.status_code == 202
    assert replay.json() == job.json()  # the first response, even though the job moved on since
    jobs = client.get("/v1/jobs", headers=headers).json()["items"]
    assert [j["id"] for j in jobs] == [job.json()["id"]]

    changed = {**body, "pipeline": [{"op": "quantize", "mode": "dynamic", "dtype": "int8"}]}
    resp = client.post("/v1/jobs", json=changed, headers=key)
    assert resp.status_code == 422
    assert resp.json()["code"] == "idempotency_key_reused"
