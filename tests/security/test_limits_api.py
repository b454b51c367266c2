"""Issue #10 item 3: per-team rates and in-flight caps, auth failures, body and pipeline caps."""

from __future__ import annotations

import json
import os
import select
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.storage import get_blob_store
from tests.conftest import free_port
from tests.security.limits_support import Embedded, embedded, hold_upload, served, tiny_onnx
from worker.runner import inspect_model


def _problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["code"] == code, body
    assert body["detail"]
    return body


def _retry_after(response: httpx.Response, at_most: int) -> int:
    value = int(response.headers["Retry-After"])
    assert 1 <= value <= at_most
    return value


@pytest.mark.slow
def test_team_request_rate_answers_429_with_retry_after(tmp_path: Path) -> None:
    with embedded(tmp_path, team_requests_per_window=5, team_window_s=60) as stack:
        noisy, quiet = stack.new_team("noisy"), stack.new_team("quiet")
        for _ in range(5):
            assert stack.client.get("/v1/models", headers=noisy).status_code == 200
        refused = stack.client.get("/v1/models", headers=noisy)
        body = _problem(refused, 429, "rate_limited")
        _retry_after(refused, 60)
        assert "5 requests in 60 s" in body["detail"]
        # Another team has its own window.
        assert stack.client.get("/v1/models", headers=quiet).status_code == 200


@pytest.mark.slow
def test_auth_failures_per_address_answer_429(tmp_path: Path) -> None:
    with embedded(tmp_path, auth_failures_per_window=3, auth_failure_window_s=60) as stack:
        good = stack.new_team("good")
        bad = {"Authorization": "Bearer cmp_not-a-real-key"}
        for _ in range(3):
            _problem(stack.client.get("/v1/models", headers=bad), 401, "invalid_api_key")
        refused = stack.client.get("/v1/models", headers=bad)
        _problem(refused, 429, "too_many_auth_failures")
        _retry_after(refused, 60)
        # The address is refused for keyed requests, a valid key included, until the window
        # moves on; requests without a key (health, catalog) still answer.
        _problem(stack.client.get("/v1/models", headers=good), 429, "too_many_auth_failures")
        assert stack.client.get("/healthz").status_code == 200


@pytest.mark.slow
def test_inflight_uploads_and_requests_are_capped_per_team(tmp_path: Path) -> None:
    with embedded(tmp_path, team_max_inflight_uploads=2, team_max_inflight_requests=2) as stack:
        slow, other = stack.new_team("slow"), stack.new_team("other")
        with served(stack.settings) as url, httpx.Client(base_url=url, timeout=30) as client:
            held = [hold_upload(url, slow) for _ in range(2)]
            try:
                files = {"file": ("m.onnx", tiny_onnx())}

                def third_upload_status() -> int:
                    return client.post("/v1/models", files=files, headers=slow).status_code

                # The held uploads take their slots once their headers are read. A held upload
                # that arrived while a probe was in flight was refused by the request cap:
                # open it again, so that both really hold their slots.
                for _ in range(100):
                    answered = select.select(held, [], [], 0)[0]
                    for sock in answered:
                        sock.close()
                        held[held.index(sock)] = hold_upload(url, slow)
                    if not answered and third_upload_status() == 429:
                        break
                    time.sleep(0.05)
                refused = client.post("/v1/models", files=files, headers=slow)
                _problem(refused, 429, "too_many_inflight_uploads")
                _retry_after(refused, 60)
                # Another team's upload is not affected.
                assert client.post("/v1/models", files=files, headers=other).status_code == 201
                # Two requests in flight (the held uploads): a third request waits its turn.
                _problem(client.get("/v1/models", headers=slow), 429, "too_many_inflight_requests")
                assert client.get("/v1/models", headers=other).status_code == 200
            finally:
                for sock in held:
                    sock.close()
            # Once the held uploads are gone, the team's slots are free again.
            for _ in range(100):
                if client.post("/v1/models", files=files, headers=slow).status_code == 201:
                    break
            else:
                pytest.fail("the team's upload slots were not released")


@pytest.mark.slow
def test_json_body_over_the_cap_is_413_before_parsing(tmp_path: Path) -> None:
    with embedded(tmp_path, max_json_body_bytes=4096) as stack:
        team = stack.new_team()
        big = {"model_id": "x", "pipeline": [{"op": "fine_tune"}] * 1000}
        body = _problem(
            stack.client.post("/v1/jobs", json=big, headers=team), 413, "body_too_large"
        )
        assert "4096 bytes" in body["detail"]
        # Without Content-Length (chunked), the cap holds while the body streams.
        chunks = (json.dumps(big)[i : i + 1000].encode() for i in range(0, 20000, 1000))
        chunked = stack.client.post(
            "/v1/jobs",
            content=chunks,
            headers={**team, "Content-Type": "application/json"},
        )
        _problem(chunked, 413, "body_too_large")


@pytest.fixture(scope="module")
def with_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Embedded, str]]:
    """An embedded deployment with one ready ONNX model (inspected for real, in the sandbox),
    no worker: created jobs stay queued."""
    with embedded(tmp_path_factory.mktemp("jobs"), team_max_active_jobs=2) as stack:
        team = stack.new_team("jobs")
        files = {"file": ("tiny.onnx", tiny_onnx())}
        model = stack.client.post("/v1/models", files=files, headers=team).json()
        inspect_model(model["id"], stack.settings, get_blob_store(stack.settings))
        ready = stack.client.get(f"/v1/models/{model['id']}", headers=team).json()
        assert ready["status"] == "ready", ready
        stack.client.headers.update(team)
        yield stack, model["id"]


def test_pipeline_over_the_cap_is_422_naming_pipeline(with_model: tuple[Embedded, str]) -> None:
    stack, model_id = with_model
    steps = [{"op": "prune", "sparsity": 0.1}] * 33
    response = stack.client.post("/v1/jobs", json={"model_id": model_id, "pipeline": steps})
    body = _problem(response, 422, "pipeline_too_long")
    assert body["field"] == "pipeline"
    assert body["max_steps"] == 32
    # The 20,000-step pipeline of the issue never reaches the parser: its body is over 256 KiB.
    huge = {"model_id": model_id, "pipeline": [{"op": "prune", "sparsity": 0.1}] * 20_000}
    _problem(stack.client.post("/v1/jobs", json=huge), 413, "body_too_large")


@pytest.mark.parametrize("version", [999, 0, 2, "1"])
def test_unknown_config_version_is_422_naming_the_field(
    with_model: tuple[Embedded, str], version: Any
) -> None:
    stack, model_id = with_model
    steps = [{"op": "quantize", "dtype": "fp16", "version": version}]
    response = stack.client.post("/v1/jobs", json={"model_id": model_id, "pipeline": steps})
    body = _problem(response, 422, "invalid_pipeline")
    assert body["field"] == "pipeline[0].version"
    overrides = {"quantize": {"version": version}}
    response = stack.client.post(
        "/v1/jobs", json={"model_id": model_id, "preset": "fp16", "overrides": overrides}
    )
    assert _problem(response, 422, "invalid_pipeline")["field"] == "pipeline[0].version"


def test_active_jobs_are_capped_per_team(with_model: tuple[Embedded, str]) -> None:
    stack, model_id = with_model
    job = {"model_id": model_id, "preset": "fp16"}
    first = stack.client.post("/v1/jobs", json=job)
    assert first.status_code == 202, first.text
    assert stack.client.post("/v1/jobs", json=job).status_code == 202
    refused = stack.client.post("/v1/jobs", json=job)
    body = _problem(refused, 429, "too_many_active_jobs")
    assert "2 queued or running jobs" in body["detail"]
    _retry_after(refused, 60)
    # A canceled job no longer counts, and retrying it counts again.
    assert stack.client.post(f"/v1/jobs/{first.json()['id']}/cancel").status_code == 200
    assert stack.client.post("/v1/jobs", json=job).status_code == 202
    retry = stack.client.post(f"/v1/jobs/{first.json()['id']}/retry")
    _problem(retry, 429, "too_many_active_jobs")


@pytest.mark.integration
def test_api_processes_share_team_counters_through_redis(tmp_path: Path) -> None:
    """Two API apps on one Redis (as several production processes): one window per team."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.security.limits_support import embedded_env, settings_for

    redis_url = os.environ.get("COMPAAS_TEST_REDIS", "redis://127.0.0.1:6379/15")
    limits = {"team_requests_per_window": 6, "rate_limit_storage_url": redis_url}
    with embedded(tmp_path, **limits) as first:
        team = first.new_team("shared")
        with TestClient(create_app(settings_for(embedded_env(tmp_path, **limits)))) as second:
            for client in (first.client, second, first.client, second, first.client, second):
                assert client.get("/v1/models", headers=team).status_code == 200
            _problem(second.get("/v1/models", headers=team), 429, "rate_limited")
            _problem(first.client.get("/v1/models", headers=team), 429, "rate_limited")


@pytest.mark.slow
def test_counters_fail_open_while_their_redis_is_down(tmp_path: Path) -> None:
    """Rate limits must not take the API down with Redis: requests go through uncounted."""
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with embedded(tmp_path, rate_limit_storage_url=closed, team_requests_per_window=1) as stack:
        team = stack.new_team("redis-down")
        for _ in range(3):  # over the limit of 1, but nothing can count them
            assert stack.client.get("/v1/models", headers=team).status_code == 200
        bad = {"Authorization": "Bearer cmp_not-a-real-key"}
        _problem(stack.client.get("/v1/models", headers=bad), 401, "invalid_api_key")
