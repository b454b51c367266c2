"""Operator endpoints on Postgres and Redis with a worker running: liveness, readiness naming
each dependency, Prometheus metrics. The embedded default's are in tests/api/test_health.py."""

from __future__ import annotations

import pytest

from tests.conftest import Stack

pytestmark = pytest.mark.integration


def test_health_ready_and_metrics(pg_stack: Stack) -> None:
    assert pg_stack.client.get("/healthz").json() == {"status": "ok"}
    ready = pg_stack.client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready"
    assert body["checks"] == {"database": "ok", "broker": "ok"}
    assert body["sandbox"]["require"] == ["network"]
    text = pg_stack.client.get("/metrics").text
    for status in ("queued", "running", "succeeded", "failed", "canceled"):
        assert f'compaas_jobs{{status="{status}"}}' in text
    assert 'compaas_models{status="ready"}' in text
