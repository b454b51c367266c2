"""Uploads never wait behind jobs: model inspection has a queue and a worker process of its own.

Real Postgres, Redis and two Celery worker processes, deployed as docker-compose.yml does: a job
worker on the job queue (one slot) and an inspector on the inspection queue. While a training
job that runs for a minute holds the job worker, a new upload is inspected (in the sandboxed
child) and `ready` within seconds, and a job on it can be created at once."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import PG_ADMIN_URL, export_onnx, own_queues
from tests.integration.conftest import Stack, slow_mlp, start_stack, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.exclusive]

# fine_tune on the 64-2048-2048-2048-10 MLP: a few seconds an epoch on one core, so the job
# holds the job worker for well over a minute (the test cancels it once it has what it needs)
LONG_JOB = [{"op": "fine_tune", "epochs": 40}]
READY_WITHIN_S = 5.0


@pytest.fixture(scope="module")
def iq_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Postgres (a database of its own) + Redis, a job worker on the job queue and an inspector
    on the inspection queue, as in docker-compose.yml."""
    name = f"compaas_iq_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    tmp = tmp_path_factory.mktemp("iq-stack")
    env = {
        "COMPAAS_MODE": "embedded",
        "COMPAAS_DATA_DIR": str(tmp),
        "COMPAAS_DATABASE_URL": f"{base}/{name}",
        "COMPAAS_BROKER_URL": redis_url,
        **own_queues("iq"),
        "COMPAAS_API_KEY_PEPPER": "integration-test-pepper",
        "COMPAAS_JOB_MEMORY_LIMIT_MB": "6144",
    }
    stacks = start_stack("inspect-queue", env, tmp, workers=0)
    try:
        stack = next(stacks)
        stack.start_worker(queues=stack.settings.worker_queues)  # `worker`
        stack.start_worker(queues=stack.settings.inspection_queue)  # `inspector`
        yield stack
    finally:
        stacks.close()  # stops both workers
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def tiny_onnx(out: Path) -> Path:
    """A 64 → 10 linear model (input `x`), the shape of slow_mlp's dataset."""
    import torch

    torch.manual_seed(1)
    return export_onnx(torch.nn.Linear(64, 10), torch.zeros(1, 64), out / "tiny.onnx")


def test_an_upload_is_ready_within_seconds_while_a_long_job_runs(
    iq_stack: Stack, tmp_path: Path
) -> None:
    stack = iq_stack
    _, team = stack.new_team("inspect-queue")
    files = slow_mlp(tmp_path / "slow")
    big = stack.upload("models", files["onnx"].with_suffix(".pt2"), team, name="big").json()
    assert stack.wait_model(big["id"], team)["status"] == "ready", stack.worker_logs()
    dataset = stack.upload("datasets", files["npz"], team).json()

    def create(model_id: str, pipeline: list[dict[str, Any]]) -> Any:
        body = {"model_id": model_id, "dataset_id": dataset["id"], "pipeline": pipeline}
        return stack.client.post("/v1/jobs", json=body, headers=team)

    def job(job_id: str) -> dict[str, Any]:
        return dict(stack.client.get(f"/v1/jobs/{job_id}", headers=team).json())

    resp = create(big["id"], LONG_JOB)
    assert resp.status_code == 202, resp.text
    long_id = resp.json()["id"]
    try:
        wait_for(lambda: job(long_id)["steps"][0]["status"] == "running", 120, 0.2)

        started = time.monotonic()
        resp = stack.upload("models", tiny_onnx(tmp_path), team, name="tiny")
        assert resp.status_code == 201, resp.text
        model = resp.json()
        assert model["status"] == "pending"

        def settled() -> dict[str, Any] | None:
            body = stack.client.get(f"/v1/models/{model['id']}", headers=team).json()
            return body if body["status"] != "pending" else None

        body = wait_for(settled, timeout=60, interval=0.05)
        took = time.monotonic() - started
        print(f"upload → ready in {took:.2f} s while a fine_tune job runs")
        assert body["status"] == "ready", body["error"]
        assert took < READY_WITHIN_S, f"the upload took {took:.1f} s to be inspected"
        # the job worker's one slot was held all along
        assert job(long_id)["status"] == "running"

        # and a job on the new model is accepted at once (not 409 model_not_ready); it waits
        # for the job worker like any other job
        resp = create(model["id"], [{"op": "quantize", "mode": "dynamic", "dtype": "int8"}])
        assert resp.status_code == 202, resp.text
        assert resp.json()["status"] == "queued"
        quick_id = resp.json()["id"]
        assert job(long_id)["status"] == "running"
    finally:
        stack.client.post(f"/v1/jobs/{long_id}/cancel", headers=team)
    # with the long job canceled, the queued one runs on the freed job worker
    done = stack.wait_job(quick_id, team, timeout=120)
    assert done["status"] == "succeeded", done["error"]
