"""Every bad input gets a problem+json answer that says what was wrong and how to fix it."""

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
from tests.integration.conftest import Stack

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"


def _problem(resp: Any, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)
    body = resp.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"].endswith("/" + code)
    assert body["detail"]
    return body


def _post_file(
    client: TestClient, route: str, name: str, data: bytes, headers: dict[str, str]
) -> Any:
    return client.post(f"/v1/{route}", files={"file": (name, io.BytesIO(data))}, headers=headers)


@pytest.fixture(scope="module")
def team(pg_stack: Stack) -> dict[str, str]:
    return pg_stack.new_team("errors")[1]


@pytest.fixture(scope="module")
def ready_model(
    pg_stack: Stack, team: dict[str, str], digits_files: dict[str, Path]
) -> dict[str, Any]:
    model = pg_stack.upload("models", digits_files["onnx"], team).json()
    return pg_stack.wait_model(model["id"], team)


def test_missing_and_invalid_keys_are_401(pg_stack: Stack) -> None:
    body = _problem(pg_stack.client.get("/v1/models"), 401, "unauthorized")
    assert "Authorization: Bearer" in body["detail"]
    _problem(
        pg_stack.client.get("/v1/models", headers={"Authorization": "Bearer cmp_nope"}),
        401,
        "invalid_api_key",
    )
    _problem(
        pg_stack.client.get("/v1/models", headers={"Authorization": "Basic abc"}),
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
    pg_stack: Stack, team: dict[str, str], name: str, data: bytes, code: str
) -> None:
    body = _problem(_post_file(pg_stack.client, "models", name, data, team), 422, code)
    assert body["field"] == "file"
    assert "ONNX" in body["detail"] or "torch.export" in body["detail"]


def test_torch_save_checkpoint_is_refused_with_export_instructions(
    pg_stack: Stack, team: dict[str, str], tmp_path: Path
) -> None:
    import torch

    for obj in (torch.nn.Linear(4, 2), torch.nn.Linear(4, 2).state_dict()):
        path = tmp_path / "ckpt.pt"
        torch.save(obj, path)
        body = _problem(
            _post_file(pg_stack.client, "models", "ckpt.pt", path.read_bytes(), team),
            422,
            "pickle_refused",
        )
        assert "torch.export.export" in body["detail"]
        assert "runs arbitrary code" in body["detail"]


def test_truncated_onnx_is_422(
    pg_stack: Stack, team: dict[str, str], digits_files: dict[str, Path]
) -> None:
    data = digits_files["onnx"].read_bytes()
    body = _problem(
        _post_file(pg_stack.client, "models", "cut.onnx", data[: len(data) // 2], team),
        422,
        "invalid_model",
    )
    assert "truncated" in body["detail"]


def test_refused_uploads_leave_nothing_behind(pg_stack: Stack, team: dict[str, str]) -> None:
    before = pg_stack.client.get("/v1/models?limit=100", headers=team).json()["items"]
    resp = _post_file(pg_stack.client, "models", "junk.bin", b"\x00junk" * 100, team)
    assert resp.status_code == 422
    after = pg_stack.client.get("/v1/models?limit=100", headers=team).json()["items"]
    assert after == before
    tmp_dir = pg_stack.settings.tmp_dir
    assert not list(tmp_dir.glob("upload-*.part"))


def test_oversize_upload_is_413(pg_stack: Stack, team: dict[str, str]) -> None:
    small = pg_stack.settings.model_copy(update={"max_upload_bytes": 1000})
    with TestClient(create_app(small)) as client:
        body = _problem(
            _post_file(client, "models", "big.onnx", b"\x08" * 5000, team), 413, "upload_too_large"
        )
        assert body["limit_bytes"] == 1000
        assert "COMPAAS_MAX_UPLOAD_BYTES" in body["detail"]
    assert not list(pg_stack.settings.tmp_dir.glob("upload-*.part"))


def test_upload_without_file_part_is_422(pg_stack: Stack, team: dict[str, str]) -> None:
    resp = pg_stack.client.post("/v1/models", data={"name": "x"}, headers=team)
    assert resp.status_code in (415, 422)
    assert resp.headers["content-type"].startswith(PROBLEM)
    resp = pg_stack.client.post(
        "/v1/models", files={"other": ("a", io.BytesIO(b"x"))}, headers=team
    )
    body = _problem(resp, 422, "validation_error")
    assert "'file'" in body["detail"]


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_bad_datasets_are_422(pg_stack: Stack, team: dict[str, str]) -> None:
    client = pg_stack.client
    body = _problem(
        _post_file(
            client, "datasets", "d.npz", _npz(x=np.zeros((10, 4)), labels=np.zeros(9, int)), team
        ),
        422,
        "dataset_invalid",
    )
    assert "first dimension" in body["detail"]
    body = _problem(
        _post_file(
            client, "datasets", "d.npz", _npz(x=np.zeros((4, 2)), labels=np.zeros((4, 2))), team
        ),
        422,
        "dataset_invalid",
    )
    assert "labels" in body["detail"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x.npy", pickle.dumps(np.zeros(3)))
    _problem(_post_file(client, "datasets", "p.npz", buf.getvalue(), team), 422, "dataset_invalid")
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x.npy", obj.getvalue())
    body = _problem(
        _post_file(client, "datasets", "o.npz", buf.getvalue(), team), 422, "dataset_invalid"
    )
    assert "object" in body["detail"]
    _problem(
        _post_file(client, "datasets", "t.txt", b"1,2,3\n4,5,6\n", team), 422, "dataset_invalid"
    )


def test_unknown_op_lists_valid_ops(
    pg_stack: Stack, team: dict[str, str], ready_model: dict[str, Any]
) -> None:
    resp = pg_stack.client.post(
        "/v1/jobs",
        json={"model_id": ready_model["id"], "pipeline": [{"op": "shrinkify"}]},
        headers=team,
    )
    body = _problem(resp, 422, "invalid_pipeline")
    assert "quantize" in body["detail"] and "shrinkify" in body["detail"]
    assert body["field"] == "pipeline[0].op"
    assert "quantize" in body["valid_ops"]


def test_channel_pruning_of_an_onnx_model_is_refused_at_creation(
    pg_stack: Stack, team: dict[str, str], ready_model: dict[str, Any]
) -> None:
    resp = pg_stack.client.post(
        "/v1/jobs",
        json={
            "model_id": ready_model["id"],
            "pipeline": [{"op": "prune", "granularity": "channels", "sparsity": 0.5}],
        },
        headers=team,
    )
    body = _problem(resp, 422, "invalid_pipeline")
    assert body["field"] == "pipeline[0].granularity"
    assert ".pt2" in body["detail"] and "unstructured" in body["detail"]


def test_bad_op_config_names_the_field(
    pg_stack: Stack, team: dict[str, str], ready_model: dict[str, Any]
) -> None:
    resp = pg_stack.client.post(
        "/v1/jobs",
        json={"model_id": ready_model["id"], "pipeline": [{"op": "quantize", "dtype": "int3"}]},
        headers=team,
    )
    body = _problem(resp, 422, "invalid_pipeline")
    assert body["field"] == "pipeline[0].dtype"
    resp = pg_stack.client.post(
        "/v1/jobs",
        json={
            "model_id": ready_model["id"],
            "pipeline": [{"op": "quantize", "dtype": "fp16", "mode": "static"}],
        },
        headers=team,
    )
    assert "fp16" in _problem(resp, 422, "invalid_pipeline")["detail"]
    resp = pg_stack.client.post("/v1/jobs", json={"model_id": ready_model["id"]}, headers=team)
    _problem(resp, 422, "validation_error")


def test_dataset_that_does_not_match_the_model_says_which_input(
    pg_stack: Stack, team: dict[str, str], ready_model: dict[str, Any]
) -> None:
    client = pg_stack.client
    wrong_shape = _post_file(
        client,
        "datasets",
        "w.npz",
        _npz(x=np.zeros((5, 64), np.float32), labels=np.zeros(5, int)),
        team,
    ).json()
    input_name = ready_model["inputs"][0]["name"]
    resp = client.post(
        "/v1/jobs",
        json={
            "model_id": ready_model["id"],
            "dataset_id": wrong_shape["id"],
            "pipeline": [{"op": "quantize", "mode": "static", "dtype": "int8"}],
        },
        headers=team,
    )
    body = _problem(resp, 422, "dataset_mismatch")
    assert input_name in body["detail"] and "[5, 64]" in body["detail"]
    assert body["field"] == "dataset_id"
    wrong_name = _post_file(
        client,
        "datasets",
        "n.npz",
        _npz(a=np.zeros((5, 1, 8, 8), np.float32), b=np.zeros((5, 1, 8, 8), np.float32)),
        team,
    ).json()
    resp = client.post(
        "/v1/jobs",
        json={
            "model_id": ready_model["id"],
            "dataset_id": wrong_name["id"],
            "pipeline": [{"op": "quantize", "mode": "static", "dtype": "int8"}],
        },
        headers=team,
    )
    body = _problem(resp, 422, "dataset_mismatch")
    assert f"'{input_name}'" in body["detail"] and "a, b" in body["detail"]


def test_other_teams_objects_are_404(
    pg_stack: Stack,
    team: dict[str, str],
    ready_model: dict[str, Any],
    digits_files: dict[str, Path],
) -> None:
    client = pg_stack.client
    _, other = pg_stack.new_team("other")
    _problem(client.get(f"/v1/models/{ready_model['id']}", headers=other), 404, "not_found")
    _problem(
        client.get(f"/v1/models/{ready_model['id']}/download", headers=other), 404, "not_found"
    )
    _problem(client.delete(f"/v1/models/{ready_model['id']}", headers=other), 404, "not_found")
    resp = client.post(
        "/v1/jobs",
        json={"model_id": ready_model["id"], "pipeline": [{"op": "quantize", "dtype": "fp16"}]},
        headers=other,
    )
    _problem(resp, 404, "not_found")
    assert all(
        m["id"] != ready_model["id"]
        for m in client.get("/v1/models", headers=other).json()["items"]
    )
    dataset = _post_file(client, "datasets", "d.npz", digits_files["npz"].read_bytes(), team).json()
    _problem(client.get(f"/v1/datasets/{dataset['id']}", headers=other), 404, "not_found")
    resp = client.post(
        "/v1/jobs",
        json={
            "model_id": ready_model["id"],
            "dataset_id": dataset["id"],
            "pipeline": [{"op": "quantize", "dtype": "fp16"}],
        },
        headers=team,
    )
    job = resp.json()
    _problem(client.get(f"/v1/jobs/{job['id']}", headers=other), 404, "not_found")
    done = pg_stack.wait_job(job["id"], team)
    for art in done["artifacts"]:
        _problem(client.get(f"/v1/artifacts/{art['id']}/download", headers=other), 404, "not_found")


def test_invalid_cursor_and_limits(pg_stack: Stack, team: dict[str, str]) -> None:
    _problem(pg_stack.client.get("/v1/models?cursor=zzz", headers=team), 422, "invalid_cursor")
    body = _problem(
        pg_stack.client.get("/v1/jobs?limit=1000", headers=team), 422, "validation_error"
    )
    assert body["field"] == "limit"
    _problem(pg_stack.client.get("/v1/jobs?status=exploded", headers=team), 422, "validation_error")


def test_unsatisfiable_range_is_416(
    pg_stack: Stack, team: dict[str, str], ready_model: dict[str, Any]
) -> None:
    resp = pg_stack.client.get(
        f"/v1/models/{ready_model['id']}/download",
        headers={**team, "Range": f"bytes={ready_model['size_bytes'] + 10}-"},
    )
    _problem(resp, 416, "range_not_satisfiable")
    assert resp.headers["content-range"] == f"bytes */{ready_model['size_bytes']}"


def test_model_that_onnxruntime_cannot_load_becomes_invalid(
    pg_stack: Stack, team: dict[str, str], tmp_path: Path
) -> None:
    import onnx
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
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    resp = pg_stack.upload("models", path, team)
    assert resp.status_code == 201, resp.text
    done = pg_stack.wait_model(resp.json()["id"], team)
    assert done["status"] == "invalid"
    assert done["error"]["code"] == "invalid_model"
    assert "FancyOp" in done["error"]["detail"] or "custom" in done["error"]["detail"]
    job = pg_stack.client.post(
        "/v1/jobs",
        json={"model_id": done["id"], "pipeline": [{"op": "quantize", "dtype": "fp16"}]},
        headers=team,
    )
    _problem(job, 422, "model_invalid")
