"""The SDK's network behaviour, with faults injected at the transport (httpx.MockTransport):
retries with one Idempotency-Key, problem+json errors, event-stream resume, checked downloads."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from compaas import (
    ApiError,
    AsyncClient,
    ChecksumMismatch,
    Client,
    NetworkError,
    RetryPolicy,
)

FAST = RetryPolicy(attempts=4, backoff_s=0.001, max_backoff_s=0.002)
NOW = "2026-12-01T00:00:00Z"


def job_json(job_id: str = "job-1", status: str = "queued", **extra: Any) -> dict[str, Any]:
    return {
        "id": job_id,
        "model_id": "model-1",
        "dataset_id": None,
        "status": status,
        "progress": 1.0 if status == "succeeded" else 0.0,
        "current_step": None,
        "preset": "edge-int8",
        "evaluation": {"task": "classification"},
        "export": ["onnx"],
        "seed": 0,
        "steps": [],
        "metrics": None,
        "artifacts": [],
        "warnings": [],
        "error": None,
        "attempts": 0,
        "created_at": NOW,
        "started_at": None,
        "finished_at": None,
        **extra,
    }


def client(handler: Callable[[httpx.Request], httpx.Response]) -> Client:
    return Client("http://api.test", "cmp_key", retry=FAST, transport=httpx.MockTransport(handler))


def test_a_post_is_retried_after_network_errors_with_one_idempotency_key() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) == 1:
            raise httpx.ConnectError("connection refused", request=request)
        if len(seen) == 2:
            raise httpx.ReadTimeout("timed out", request=request)
        return httpx.Response(202, json=job_json())

    with client(handler) as sdk:
        job = sdk.jobs.create("model-1", preset="edge-int8")
    assert job.id == "job-1" and job.status == "queued"
    assert len(seen) == 3
    keys = {r.headers["Idempotency-Key"] for r in seen}
    assert len(keys) == 1 and keys.pop().startswith("compaas-sdk-")
    assert all(r.headers["Authorization"] == "Bearer cmp_key" for r in seen)
    assert json.loads(seen[-1].content) == {"model_id": "model-1", "preset": "edge-int8"}


def test_gateway_answers_are_retried_then_raised_as_the_api_error() -> None:
    calls: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.headers.get("Idempotency-Key"))
        return httpx.Response(503, json={"code": "unavailable", "detail": "try later"})

    with client(handler) as sdk, pytest.raises(ApiError) as caught:
        sdk.jobs.cancel("job-1")
    assert len(calls) == FAST.attempts and len(set(calls)) == 1
    assert (caught.value.status, caught.value.code, caught.value.detail) == (
        503,
        "unavailable",
        "try later",
    )


def test_a_refusal_is_not_retried_and_carries_its_problem() -> None:
    problem = {
        "type": "about:blank",
        "title": "Conflict",
        "status": 409,
        "code": "model_not_ready",
        "detail": "The model is still being inspected; wait until it is ready.",
        "field": "model_id",
    }
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(
            409, json=problem, headers={"content-type": "application/problem+json"}
        )

    with client(handler) as sdk, pytest.raises(ApiError) as caught:
        sdk.jobs.create("model-1", preset="edge-int8")
    assert len(calls) == 1
    error = caught.value
    assert (error.status, error.code, error.field) == (409, "model_not_ready", "model_id")
    assert error.problem == problem
    assert "model_not_ready" in str(error) and "still being inspected" in str(error)


def test_an_unreachable_api_is_a_network_error_after_every_try() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("connection refused", request=request)

    with client(handler) as sdk, pytest.raises(NetworkError, match="after 4 tries"):
        sdk.jobs.get("job-1")
    assert len(calls) == 4


def test_a_job_body_is_checked_against_the_api_schema_before_it_is_sent() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("nothing may be sent")

    with client(handler) as sdk, pytest.raises(ValueError, match="seed"):
        sdk.jobs.create("model-1", preset="edge-int8", seed=-1)


def sse(*events: tuple[int, str, dict[str, Any]]) -> bytes:
    body = "retry: 2000\n\n"
    for event_id, kind, data in events:
        body += f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"
    return body.encode()


def test_the_event_stream_resumes_after_the_last_event_seen() -> None:
    asked: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/jobs/job-1/events"
        asked.append(request.headers.get("Last-Event-ID"))
        headers = {"content-type": "text/event-stream"}
        if len(asked) == 1:  # cut after two events, before `done`
            body = sse((1, "status", {"status": "running"}), (2, "progress", {"progress": 0.5}))
            return httpx.Response(200, content=body, headers=headers)
        if len(asked) == 2:
            raise httpx.RemoteProtocolError("peer closed connection", request=request)
        body = sse((3, "status", {"status": "succeeded"}), (4, "done", {"status": "succeeded"}))
        return httpx.Response(200, content=body, headers=headers)

    with client(handler) as sdk:
        events = list(sdk.jobs.stream("job-1"))
    assert [(e.id, e.type) for e in events] == [
        (1, "status"),
        (2, "progress"),
        (3, "status"),
        (4, "done"),
    ]
    assert events[1].data == {"progress": 0.5} and events[-1].terminal
    assert asked == ["0", "2", "2"]


def test_wait_falls_back_to_polling_where_there_is_no_event_stream() -> None:
    polls = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            return httpx.Response(404, json={"code": "not_found", "detail": "no such route"})
        if request.url.params.get("view") == "status":
            polls.append(request)
            status = "running" if len(polls) < 2 else "succeeded"
            body = {"id": "job-1", "status": status, "progress": 0.5, "current_step": 0}
            return httpx.Response(200, json={**body, "updated_at": NOW})
        return httpx.Response(200, json=job_json(status="succeeded"))

    with Client(
        "http://api.test",
        "k",
        retry=FAST,
        transport=httpx.MockTransport(handler),
        poll_interval_s=0.01,
    ) as sdk:
        job = sdk.jobs.wait("job-1")
    assert job.succeeded and len(polls) == 2


def artifact_json(data: bytes, artifact_id: str = "art-1") -> dict[str, Any]:
    return {
        "id": artifact_id,
        "job_id": "job-1",
        "step_index": None,
        "role": "final",
        "format": "onnx",
        "size_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "verdict": "ok",
        "created_at": NOW,
    }


def test_downloads_use_the_server_name_and_check_the_sha256(tmp_path: Path) -> None:
    good, sent = b"onnx-bytes" * 1000, {"art-1": b"onnx-bytes" * 1000, "art-2": b"tampered"}
    artifacts = [artifact_json(good, "art-1"), artifact_json(b"original", "art-2")]
    attempts = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/jobs/job-1":
            return httpx.Response(200, json=job_json(status="succeeded", artifacts=artifacts))
        artifact_id = request.url.path.split("/")[3]
        attempts.append(artifact_id)
        if len(attempts) == 1:
            raise httpx.ReadError("reset by peer", request=request)
        disposition = f"attachment; filename*=UTF-8''digits-{artifact_id}%20final.onnx"
        headers = {"content-disposition": disposition}
        return httpx.Response(200, content=sent[artifact_id], headers=headers)

    with client(handler) as sdk:
        job = sdk.jobs.get("job-1")
        path = sdk.jobs.download_artifact(job.artifacts[0], tmp_path)
        assert path == tmp_path / "digits-art-1 final.onnx"
        assert path.read_bytes() == good
        with pytest.raises(ChecksumMismatch, match="art-2|digits-art-2"):
            sdk.jobs.download_artifact(job.artifacts[1], tmp_path)
    assert attempts[:2] == ["art-1", "art-1"]  # the reset download was tried again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits-art-1 final.onnx"]


def test_the_async_client_retries_the_same_way() -> None:
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) < 3:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path.endswith("/events"):
            body = sse((7, "done", {"status": "succeeded"}))
            return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})
        if request.method == "POST":
            return httpx.Response(202, json=job_json())
        return httpx.Response(200, json=job_json(status="succeeded"))

    async def run() -> tuple[str, str]:
        transport = httpx.MockTransport(handler)
        async with AsyncClient("http://api.test", "k", retry=FAST, transport=transport) as sdk:
            created = await sdk.jobs.create("model-1", preset="fp16")
            done = await created.wait()
            return created.status, done.status

    assert asyncio.run(run()) == ("succeeded", "succeeded")
    posts = [r for r in seen if r.method == "POST"]
    assert len(posts) == 3 and len({r.headers["Idempotency-Key"] for r in posts}) == 1


def test_auto_budget_objective_and_search_reach_the_request_body() -> None:
    sent: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(202, json=job_json(preset="auto"))

    with client(handler) as sdk:
        job = sdk.jobs.create(
            "model-1",
            dataset_id="data-1",
            preset="auto",
            budget={"max_accuracy_drop": 0.01, "max_size_bytes": 2_000_000},
            objective="balanced",
            search={"max_minutes": 5, "max_candidates": 4},
        )
    assert job.read.preset == "auto"
    (body,) = sent
    assert body["budget"] == {"max_accuracy_drop": 0.01, "max_size_bytes": 2_000_000}
    assert body["objective"] == "balanced"
    assert body["search"] == {"max_minutes": 5, "max_candidates": 4}
