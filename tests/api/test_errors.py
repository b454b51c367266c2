"""Every bad input gets a problem+json answer that says what was wrong and how to fix it.

In process, on the embedded default (SQLite, local blobs), with no worker: models are made ready
by the worker's own inspection run here (`Stack.inspect_here`); created jobs stay queued.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.conftest import PROBLEM, Stack, npz_bytes, problem


def test_missing_and_invalid_keys_are_401(api_stack: Stack) -> None:
    body = problem(api_stack.client.get("/v1/models"), 401, "unauthorized")
    assert "Authorization: Bearer" in body["detail"]
    problem(
        api_stack.client.get("/v1/models", headers={"Authorization": "Bearer cmp_nope"}),
        401,
        "invalid_api_key",
    )
    problem(
        api_stack.client.get("/v1/models", headers={"Authorization": "Basic abc"}),
        401,
        "unauthorized",
    )


@pytest.mark.parametrize(
    ("name", "data", "code"),
    [
        ("random.onnx", np.random.default_rng(0).bytes(4096), "unrecognized_format"),
        ("notes.onnx", b"this is a text file, not a model\n" * 20, "unrecognized_format"),
        ("empty.onnx", b"", "unrecognized_format"),
        ("model.pkl", pickle.dumps({"weight": [1.0, 2.0]}, protocol=4), "pickle_refused"),
    ],
)
def test_not_a_model_is_422(
    api_stack: Stack, api_team: dict[str, str], name: str, data: bytes, code: str
) -> None:
    body = problem(api_stack.post_file("models", name, data, api_team), 422, code)
    assert body["field"] == "file"
    assert "ONNX" in body["detail"] or "torch.export" in body["detail"]


def test_torch_save_checkpoint_is_refused_with_export_instructions(
    api_stack: Stack, api_team: dict[str, str], tmp_path: Path
) -> None:
    import torch

    for obj in (torch.nn.Linear(4, 2), torch.nn.Linear(4, 2).state_dict()):
        path = tmp_path / "ckpt.pt"
        torch.save(obj, path)
        body = problem(
            api_stack.post_file("models", "ckpt.pt", path.read_bytes(), api_team),
            422,
            "pickle_refused",
        )
        assert "torch.export.export" in body["detail"]
        assert "runs arbitrary code" in body["detail"]


def test_truncated_onnx_is_422(
    api_stack: Stack, api_team: dict[str, str], digits_files: dict[str, Path]
) -> None:
    data = digits_files["onnx"].read_bytes()
    body = problem(
        api_stack.post_file("models", "cut.onnx", data[: len(data) // 2], api_team),
        422,
        "invalid_model",
    )
    assert "truncated" in body["detail"]


def test_refused_uploads_leave_nothing_behind(api_stack: Stack, api_team: dict[str, str]) -> None:
    before = api_stack.client.get("/v1/models?limit=100", headers=api_team).json()["items"]
    resp = api_stack.post_file("models", "junk.bin", b"\x00junk" * 100, api_team)
    assert resp.status_code == 422
    after = api_stack.client.get("/v1/models?limit=100", headers=api_team).json()["items"]
    assert after == before
    assert not list(api_stack.settings.tmp_dir.glob("upload-*.part"))


def test_oversize_upload_is_413(api_stack: Stack, api_team: dict[str, str]) -> None:
    small = api_stack.settings.model_copy(update={"max_upload_bytes": 1000})
    with TestClient(create_app(small)) as client:
        resp = client.post(
            "/v1/models", files={"file": ("big.onnx", io.BytesIO(b"\x08" * 5000))}, headers=api_team
        )
        body = problem(resp, 413, "upload_too_large")
        assert body["limit_bytes"] == 1000
        assert "COMPAAS_MAX_UPLOAD_BYTES" in body["detail"]
    assert not list(api_stack.settings.tmp_dir.glob("upload-*.part"))


def test_upload_without_file_part_is_422(api_stack: Stack, api_team: dict[str, str]) -> None:
    resp = api_stack.client.post("/v1/models", data={"name": "x"}, headers=api_team)
    assert resp.status_code in (415, 422)
    assert resp.headers["content-type"].startswith(PROBLEM)
    resp = api_stack.client.post(
        "/v1/models", files={"other": ("a", io.BytesIO(b"x"))}, headers=api_team
    )
    body = problem(resp, 422, "validation_error")
    assert "'file'" in body["detail"]


def test_bad_datasets_are_422(api_stack: Stack, api_team: dict[str, str]) -> None:
    def post(name: str, data: bytes) -> Any:
        return api_stack.post_file("datasets", name, data, api_team)

    body = problem(
        post("d.npz", npz_bytes(x=np.zeros((10, 4)), labels=np.zeros(9, int))),
        422,
        "dataset_invalid",
    )
    assert "first dimension" in body["detail"]
    body = problem(
        post("d.npz", npz_bytes(x=np.zeros((4, 2)), labels=np.zeros((4, 2)))),
        422,
        "dataset_invalid",
    )
    assert "labels" in body["detail"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x.npy", pickle.dumps(np.zeros(3)))
    problem(post("p.npz", buf.getvalue()), 422, "dataset_invalid")
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x.npy", obj.getvalue())
    body = problem(post("o.npz", buf.getvalue()), 422, "dataset_invalid")
    assert "object" in body["detail"]
    problem(post("t.txt", b"1,2,3\n4,5,6\n"), 422, "dataset_invalid")


def test_unknown_op_lists_valid_ops(
    api_stack: Stack, api_team: dict[str, str], api_digits: dict[str, dict[str, Any]]
) -> None:
    resp = api_stack.client.post(
        "/v1/jobs",
        json={"model_id": api_digits["onnx"]["id"], "pipeline": [{"op": "shrinkify"}]},
        headers=api_team,
    )
    body = problem(resp, 422, "invalid_pipeline")
    assert "quantize" in body["detail"] and "shrinkify" in body["detail"]
    assert body["field"] == "pipeline[0].op"
    assert "quantize" in body["valid_ops"]


def test_channel_pruning_of_an_onnx_model_is_refused_at_creation(
    api_stack: Stack, api_team: dict[str, str], api_digits: dict[str, dict[str, Any]]
) -> None:
    resp = api_stack.client.post(
        "/v1/jobs",
        json={
            "model_id": api_digits["onnx"]["id"],
            "pipeline": [{"op": "prune", "granularity": "channels", "sparsity": 0.5}],
        },
        headers=api_team,
    )
    body = problem(resp, 422, "invalid_pipeline")
    assert body["field"] == "pipeline[0].granularity"
    assert ".pt2" in body["detail"] and "unstructured" in body["detail"]


def test_bad_op_config_names_the_field(
    api_stack: Stack, api_team: dict[str, str], api_digits: dict[str, dict[str, Any]]
) -> None:
    model_id = api_digits["onnx"]["id"]
    resp = api_stack.client.post(
        "/v1/jobs",
        json={"model_id": model_id, "pipeline": [{"op": "quantize", "dtype": "int3"}]},
        headers=api_team,
    )
    body = problem(resp, 422, "invalid_pipeline")
    assert body["field"] == "pipeline[0].dtype"
    resp = api_stack.client.post(
        "/v1/jobs",
        json={
            "model_id": model_id,
            "pipeline": [{"op": "quantize", "dtype": "fp16", "mode": "static"}],
        },
        headers=api_team,
    )
    assert "fp16" in problem(resp, 422, "invalid_pipeline")["detail"]
    resp = api_stack.client.post("/v1/jobs", json={"model_id": model_id}, headers=api_team)
    problem(resp, 422, "validation_error")


def test_dataset_that_does_not_match_the_model_says_which_input(
    api_stack: Stack, api_team: dict[str, str], api_digits: dict[str, dict[str, Any]]
) -> None:
    model = api_digits["onnx"]
    wrong_shape = api_stack.post_file(
        "datasets",
        "w.npz",
        npz_bytes(x=np.zeros((5, 64), np.float32), labels=np.zeros(5, int)),
        api_team,
    ).json()
    input_name = model["inputs"][0]["name"]
    resp = api_stack.client.post(
        "/v1/jobs",
        json={
            "model_id": model["id"],
            "dataset_id": wrong_shape["id"],
            "pipeline": [{"op": "quantize", "mode": "static", "dtype": "int8"}],
        },
        headers=api_team,
    )
    body = problem(resp, 422, "dataset_mismatch")
    assert input_name in body["detail"] and "[5, 64]" in body["detail"]
    assert body["field"] == "dataset_id"
    two_inputs = npz_bytes(
        a=np.zeros((5, 1, 8, 8), np.float32), b=np.zeros((5, 1, 8, 8), np.float32)
    )
    wrong_name = api_stack.post_file("datasets", "n.npz", two_inputs, api_team).json()
    resp = api_stack.client.post(
        "/v1/jobs",
        json={
            "model_id": model["id"],
            "dataset_id": wrong_name["id"],
            "pipeline": [{"op": "quantize", "mode": "static", "dtype": "int8"}],
        },
        headers=api_team,
    )
    body = problem(resp, 422, "dataset_mismatch")
    assert f"'{input_name}'" in body["detail"] and "a, b" in body["detail"]


def test_other_teams_objects_are_404(
    api_stack: Stack,
    api_team: dict[str, str],
    api_other_team: dict[str, str],
    api_digits: dict[str, dict[str, Any]],
    digits_files: dict[str, Path],
) -> None:
    """Models, datasets and jobs; another team's artifacts are in
    tests/integration/test_artifacts_scoped.py, since an artifact needs a job that ran."""
    client, other = api_stack.client, api_other_team
    model_id = api_digits["onnx"]["id"]
    problem(client.get(f"/v1/models/{model_id}", headers=other), 404, "not_found")
    problem(client.get(f"/v1/models/{model_id}/download", headers=other), 404, "not_found")
    problem(client.delete(f"/v1/models/{model_id}", headers=other), 404, "not_found")
    resp = client.post(
        "/v1/jobs",
        json={"model_id": model_id, "pipeline": [{"op": "quantize", "dtype": "fp16"}]},
        headers=other,
    )
    problem(resp, 404, "not_found")
    assert all(m["id"] != model_id for m in client.get("/v1/models", headers=other).json()["items"])
    dataset = api_stack.upload("datasets", digits_files["npz"], api_team).json()
    problem(client.get(f"/v1/datasets/{dataset['id']}", headers=other), 404, "not_found")
    problem(client.delete(f"/v1/datasets/{dataset['id']}", headers=other), 404, "not_found")
    resp = client.post(
        "/v1/jobs",
        json={
            "model_id": model_id,
            "dataset_id": dataset["id"],
            "pipeline": [{"op": "quantize", "dtype": "fp16"}],
        },
        headers=api_team,
    )
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    problem(client.get(f"/v1/jobs/{job_id}", headers=other), 404, "not_found")
    problem(client.post(f"/v1/jobs/{job_id}/cancel", headers=other), 404, "not_found")
    problem(client.post(f"/v1/jobs/{job_id}/retry", headers=other), 404, "not_found")
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=api_team).status_code == 200


def test_retrying_a_job_that_has_not_failed_is_409(
    api_stack: Stack, api_team: dict[str, str], api_digits: dict[str, dict[str, Any]]
) -> None:
    """The 409s of jobs that ran (cancel after success) are in tests/integration."""
    resp = api_stack.client.post(
        "/v1/jobs",
        json={"model_id": api_digits["onnx"]["id"], "preset": "fp16"},
        headers=api_team,
    )
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    problem(
        api_stack.client.post(f"/v1/jobs/{job_id}/retry", headers=api_team),
        409,
        "job_not_retryable",
    )
    assert api_stack.client.post(f"/v1/jobs/{job_id}/cancel", headers=api_team).status_code == 200


def test_invalid_cursor_and_limits(api_stack: Stack, api_team: dict[str, str]) -> None:
    client = api_stack.client
    problem(client.get("/v1/models?cursor=zzz", headers=api_team), 422, "invalid_cursor")
    body = problem(client.get("/v1/jobs?limit=1000", headers=api_team), 422, "validation_error")
    assert body["field"] == "limit"
    problem(client.get("/v1/jobs?status=exploded", headers=api_team), 422, "validation_error")


def test_unsatisfiable_range_is_416(
    api_stack: Stack, api_team: dict[str, str], api_digits: dict[str, dict[str, Any]]
) -> None:
    model = api_digits["onnx"]
    resp = api_stack.client.get(
        f"/v1/models/{model['id']}/download",
        headers={**api_team, "Range": f"bytes={model['size_bytes'] + 10}-"},
    )
    problem(resp, 416, "range_not_satisfiable")
    assert resp.headers["content-range"] == f"bytes */{model['size_bytes']}"


def test_model_that_onnxruntime_cannot_load_becomes_invalid(
    api_stack: Stack, api_team: dict[str, str]
) -> None:
    from onnx import TensorProto, helper

    node = helper.make_node("FancyOp", ["x"], ["y"], domain="com.example.custom")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example.custom", 1)],
    )
    resp = api_stack.post_file("models", "custom.onnx", model.SerializeToString(), api_team)
    assert resp.status_code == 201, resp.text
    done = api_stack.inspect_here(resp.json()["id"], api_team)
    assert done["status"] == "invalid"
    assert done["error"]["code"] == "invalid_model"
    assert "FancyOp" in done["error"]["detail"] or "custom" in done["error"]["detail"]
    job = api_stack.client.post(
        "/v1/jobs",
        json={"model_id": done["id"], "pipeline": [{"op": "quantize", "dtype": "fp16"}]},
        headers=api_team,
    )
    problem(job, 422, "model_invalid")
