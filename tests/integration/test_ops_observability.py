"""Operations you can watch, on Postgres + Redis with a real worker process: after real requests
and a real job, /metrics parses with prometheus-client's parser and its histograms count them;
the worker's output is JSON lines, and the job's lines carry its id, attempt and step."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Stack, wait_for

pytestmark = pytest.mark.integration


def scrape(stack: Stack) -> dict[str, Any]:
    resp = stack.client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {f.name: f for f in text_string_to_metric_families(resp.text)}


def value(family: Any, suffix: str = "", **labels: str) -> float | None:
    for sample in family.samples:
        if sample.name == family.name + suffix and all(
            sample.labels.get(k) == v for k, v in labels.items()
        ):
            return float(sample.value)
    return None


def json_lines(text: str) -> list[dict[str, Any]]:
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def test_metrics_and_logs_after_a_real_job(pg_stack: Stack, digits_files: dict[str, Path]) -> None:
    stack = pg_stack
    _, headers = stack.new_team("ops")
    model = stack.upload("models", digits_files["onnx"], headers, name="digits").json()
    assert stack.wait_model(model["id"], headers)["status"] == "ready"
    dataset = stack.upload("datasets", digits_files["npz"], headers).json()
    resp = stack.client.post(
        "/v1/jobs",
        json={
            "model_id": model["id"],
            "dataset_id": dataset["id"],
            "pipeline": [{"op": "quantize", "mode": "dynamic", "dtype": "int8"}],
            "evaluation": {"task": "classification"},
            "export": ["onnx"],
        },
        headers={**headers, "X-Request-ID": "ops-test-create-1"},
    )
    assert resp.status_code == 202, resp.text
    assert resp.headers["x-request-id"] == "ops-test-create-1"
    job_id = resp.json()["id"]
    job = stack.wait_job(job_id, headers)
    assert job["status"] == "succeeded", job["error"]

    # The cluster figures are cached for a few seconds: scrape until the job shows, and the
    # worker's host row (written once its start-up sandbox probe ends, which on a loaded
    # machine can be after a short job finished).
    def job_counted() -> dict[str, Any] | None:
        families = scrape(stack)
        done = value(families["compaas_job_duration_seconds"], "_count", status="succeeded")
        seen = families["compaas_worker_last_seen_timestamp_seconds"].samples
        return families if done and seen else None

    families = wait_for(job_counted, timeout=60, interval=1)

    requests = families["compaas_http_request_duration_seconds"]
    assert requests.type == "histogram"
    polls = value(requests, "_count", route="/v1/jobs/{job_id}", method="GET", status="2xx")
    assert polls is not None and polls >= 1, "wait_job's polls are counted under the template"
    assert value(requests, "_count", route="/v1/jobs", method="POST", status="2xx") >= 1  # type: ignore[operator]
    assert not [s for s in requests.samples if job_id in s.labels.get("route", "")], (
        "raw paths never become labels"
    )
    created = value(requests, "_bucket", route="/v1/jobs", method="POST", status="2xx", le="+Inf")
    assert created == value(requests, "_count", route="/v1/jobs", method="POST", status="2xx")

    jobs = families["compaas_job_duration_seconds"]
    assert jobs.type == "histogram"
    took = value(jobs, "_sum", status="succeeded")
    assert took is not None and took > 0
    steps = families["compaas_job_step_duration_seconds"]
    quantized = value(steps, "_count", op="quantize", status="succeeded")
    assert quantized is not None and quantized >= 1
    assert (value(steps, "_sum", op="quantize", status="succeeded") or 0) > 0
    assert (value(families["compaas_job_queue_wait_seconds"], "_count") or 0) >= 1

    queue = stack.settings.default_queue
    assert value(families["compaas_queue_depth"], queue=queue) == 0, "nothing left waiting"
    seen = families["compaas_worker_last_seen_timestamp_seconds"]
    assert seen.samples, "the worker host's heartbeat is exported"
    assert max(s.value for s in seen.samples) > time.time() - 3600
    kills = families["compaas_sandbox_kills"]
    assert kills.type == "counter" and value(kills, "_total", reason="memory") is not None
    assert value(families["compaas_jobs"], status="succeeded") >= 1  # type: ignore[operator]
    up = families["compaas_metrics_source_up"]
    assert value(up, source="database") == 1 and value(up, source="broker") == 1

    # The worker process's own output (stdout and stderr, as a container would log it).
    lines = json_lines(_full_worker_logs(stack))
    assert lines, "the worker logs JSON lines"
    mine = [line for line in lines if line.get("job_id") == job_id]
    events = [line["event"] for line in mine]
    assert any(e.startswith("job claimed") for e in events), events
    assert any(e.startswith("job finished: succeeded") for e in events), events
    step_lines = [line for line in mine if "step" in line]
    assert step_lines and all(line["step"] == 0 for line in step_lines)
    assert all(line["attempt"] == 1 for line in mine if "attempt" in line)
    assert {line["process"] for line in mine} == {"worker"}
    task_ids = {line.get("task_id") for line in mine}
    assert len(task_ids) == 1 and None not in task_ids, "one delivery, its Celery task id"
    assert any(
        line["logger"] == "celery.app.trace" and "succeeded" in line["event"] for line in mine
    ), "Celery's own line about the task carries the job id too"
    assert all({"timestamp", "level", "logger"} <= line.keys() for line in mine)


def _full_worker_logs(stack: Stack) -> str:
    """Every worker log file of the stack in full (Stack.worker_logs keeps only their tails)."""
    folder = stack.worker_log.parent
    return "\n".join(p.read_text() for p in sorted(folder.glob("worker-*.log")))


def test_a_canceled_job_counts_an_aborted_sandbox_kill(
    pg_stack: Stack, digits_files: dict[str, Path]
) -> None:
    """The worker kills the sandbox child of a job canceled while it runs; /metrics counts it
    under reason `aborted`, read from the database the worker wrote it to."""
    stack = pg_stack
    _, headers = stack.new_team("ops-cancel")
    model = stack.upload("models", digits_files["onnx"], headers, name="digits").json()
    assert stack.wait_model(model["id"], headers)["status"] == "ready"
    dataset = stack.upload("datasets", digits_files["npz"], headers).json()

    def aborted() -> float:
        return value(scrape(stack)["compaas_sandbox_kills"], "_total", reason="aborted") or 0.0

    before = aborted()
    resp = stack.client.post(
        "/v1/jobs",
        json={
            "model_id": model["id"],
            "dataset_id": dataset["id"],
            "pipeline": [{"op": "quantize", "mode": "static", "dtype": "int8"}],
            "evaluation": {"task": "classification"},
            "export": ["onnx"],
        },
        headers=headers,
    )
    job_id = resp.json()["id"]

    def step_running() -> bool:
        body = stack.client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        assert body["status"] in ("queued", "running"), body
        return body["current_step"] == 0

    wait_for(step_running, timeout=60, interval=0.2)  # the sandbox child is at work
    canceled = stack.client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    wait_for(lambda: aborted() >= before + 1, timeout=30, interval=1)
    mine = [line for line in json_lines(_full_worker_logs(stack)) if line.get("job_id") == job_id]
    assert any("abandoning attempt" in line["event"] for line in mine), mine
