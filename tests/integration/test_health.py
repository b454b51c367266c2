"""Operator endpoints: liveness, readiness naming each dependency, Prometheus metrics."""

from __future__ import annotations

import pytest

from tests.integration.conftest import Stack

pytestmark = pytest.mark.integration


def test_health_ready_and_metrics(stack: Stack) -> None:
    assert stack.client.get("/healthz").json() == {"status": "ok"}
    ready = stack.client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready"
    assert body["checks"] == {"database": "ok", "broker": "ok"}
    assert body["sandbox"]["require"] == ["network"]
    text = stack.client.get("/metrics").text
    for status in ("queued", "running", "succeeded", "failed", "canceled"):
        assert f'compaas_jobs{{status="{status}"}}' in text
    assert 'compaas_models{status="ready"}' in text
