"""A deleted dataset or model is gone: the next read is a 404."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.conftest import Stack, npz_bytes, problem


def test_delete_dataset_and_model(
    api_stack: Stack, api_team: dict[str, str], digits_files: dict[str, Path]
) -> None:
    client = api_stack.client
    data = npz_bytes(x=np.zeros((3, 3), np.float32))
    uploads = {
        "datasets": api_stack.post_file("datasets", "d3.npz", data, api_team),
        "models": api_stack.upload("models", digits_files["onnx"], api_team),
    }
    for route, resp in uploads.items():
        assert resp.status_code == 201, resp.text
        url = f"/v1/{route}/{resp.json()['id']}"
        assert client.delete(url, headers=api_team).status_code == 204
        problem(client.get(url, headers=api_team), 404, "not_found")
        problem(client.delete(url, headers=api_team), 404, "not_found")
