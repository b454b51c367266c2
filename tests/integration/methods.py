"""A small client for the method tests: upload once, submit jobs, fetch artifacts."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from tests.integration.conftest import Stack


@dataclass
class Client:
    """One team on a stack, with its uploads cached by file."""

    stack: Stack
    headers: dict[str, str]
    ids: dict[Path, str] = field(default_factory=dict)

    def upload(self, route: str, path: Path) -> str:
        if path not in self.ids:
            resp = self.stack.upload(route, path, self.headers)
            assert resp.status_code == 201, resp.text
            body = resp.json()
            if route == "models":
                body = self.stack.wait_model(body["id"], self.headers)
                assert body["status"] == "ready", body
            self.ids[path] = body["id"]
        return self.ids[path]

    def submit(self, model: Path, dataset: Path | None, **body: Any) -> Any:
        payload = {"model_id": self.upload("models", model), **body}
        if dataset is not None:
            payload["dataset_id"] = self.upload("datasets", dataset)
        return self.stack.client.post("/v1/jobs", json=payload, headers=self.headers)

    def run(self, model: Path, dataset: Path | None, **body: Any) -> dict[str, Any]:
        resp = self.submit(model, dataset, **body)
        assert resp.status_code == 202, resp.text
        job = self.stack.wait_job(resp.json()["id"], self.headers, timeout=600)
        assert job["status"] == "succeeded", job["error"]
        return dict(job)

    def artifact(self, job: dict[str, Any], fmt: str = "onnx") -> bytes:
        (art,) = [a for a in job["artifacts"] if a["role"] == "final" and a["format"] == fmt]
        resp = self.stack.client.get(f"/v1/artifacts/{art['id']}/download", headers=self.headers)
        assert resp.status_code == 200, resp.text
        return bytes(resp.content)


def ratio(job: dict[str, Any], metric: str) -> float:
    """final / original of a metric."""
    metrics = job["metrics"]
    return float(metrics["final"][metric]) / float(metrics["original"][metric])


def run_onnx(data: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def weights(data: bytes) -> dict[str, np.ndarray]:
    """Weight inputs (index 1) of the Conv/Gemm/MatMul nodes, by node name."""
    model = onnx.load_model_from_string(data)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    return {
        n.name: inits[n.input[1]]
        for n in model.graph.node
        if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in inits
    }


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()
