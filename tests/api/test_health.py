"""Operator endpoints on the embedded default (SQLite, filesystem broker): liveness, readiness
naming each dependency, Prometheus metrics. The same on Postgres and Redis is in
tests/integration/test_health_postgres.py."""

from __future__ import annotations

from tests.conftest import Stack


def test_health_ready_and_metrics(api_stack: Stack) -> None:
    assert api_stack.client.get("/healthz").json() == {"status": "ok"}
    ready = api_stack.client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready"
    assert body["checks"] == {"database": "ok", "broker": "ok"}
    assert body["sandbox"]["require"] == ["network"]
    text = api_stack.client.get("/metrics").text
    for status in ("queued", "running", "succeeded", "failed", "canceled"):
        assert f'compaas_jobs{{status="{status}"}}' in text
    assert 'compaas_models{status="ready"}' in text
    for kind in ("upload_part", "orphan_blob", "scratch_dir"):
        assert f'compaas_janitor_reclaimed_bytes_total{{kind="{kind}"}}' in text
        assert f'compaas_janitor_reclaimed_files_total{{kind="{kind}"}}' in text
    assert "# TYPE compaas_janitor_reclaimed_bytes_total counter" in text
