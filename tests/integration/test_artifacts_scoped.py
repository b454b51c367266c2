"""The 4xx answers that need a job to have run on a worker. Every other bad input is tested in
process, without a worker, in tests/api/test_errors.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Stack, problem

pytestmark = pytest.mark.integration


def test_other_teams_artifacts_are_404(pg_stack: Stack, digits_files: dict[str, Path]) -> None:
    client = pg_stack.client
    _, team = pg_stack.new_team("errors")
    _, other = pg_stack.new_team("other")
    model = pg_stack.upload("models", digits_files["onnx"], team).json()
    model = pg_stack.wait_model(model["id"], team)
    dataset = pg_stack.upload("datasets", digits_files["npz"], team).json()
    resp = client.post(
        "/v1/jobs",
        json={
            "model_id": model["id"],
            "dataset_id": dataset["id"],
            "pipeline": [{"op": "quantize", "dtype": "fp16"}],
        },
        headers=team,
    )
    assert resp.status_code == 202, resp.text
    done = pg_stack.wait_job(resp.json()["id"], team)
    assert done["artifacts"]
    for art in done["artifacts"]:
        problem(client.get(f"/v1/artifacts/{art['id']}", headers=other), 404, "not_found")
        problem(client.get(f"/v1/artifacts/{art['id']}/download", headers=other), 404, "not_found")
