"""COMPAAS_OPS_TOKEN: /metrics, /docs, /redoc and /openapi.json open without it, closed with it."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.config import Settings
from app.db.migrate import upgrade
from app.main import create_app

OPS_PAGES = ["/metrics", "/docs", "/redoc", "/openapi.json"]


def make_client(tmp_path: Path, ops_token: str) -> TestClient:
    settings = Settings(
        mode="embedded",
        data_dir=tmp_path,
        database_url="",
        broker_url="",
        api_key_pepper="ops-test-pepper",
        ops_token=ops_token,
        run_reconciler=False,
    )
    upgrade(settings.database_url)
    return TestClient(create_app(settings))


def test_without_a_token_the_ops_pages_are_open(tmp_path: Path) -> None:
    client = make_client(tmp_path, "")
    for page in OPS_PAGES:
        assert client.get(page).status_code == 200, page
    assert "compaas_jobs" in client.get("/metrics").text
    assert "/v1/models" in client.get("/openapi.json").json()["paths"]
    assert "/openapi.json" in client.get("/docs").text
    assert "/openapi.json" in client.get("/redoc").text


def test_with_a_token_the_ops_pages_need_it(tmp_path: Path) -> None:
    token = secrets.token_hex(32)
    client = make_client(tmp_path, token)
    wrong = [
        {},
        {"Authorization": f"Bearer {secrets.token_hex(32)}"},
        {"Authorization": f"Bearer {token[:-1]}"},
        {"Authorization": f"Basic {token}"},
        {"Authorization": "Bearer cmp_" + "A" * 43},  # a team key does not open them
    ]
    for page in OPS_PAGES:
        for headers in wrong:
            resp = client.get(page, headers=headers)
            assert resp.status_code == 401, (page, headers)
            assert resp.headers["content-type"] == "application/problem+json"
            assert resp.headers["www-authenticate"] == 'Bearer realm="compaas-ops"'
            body = resp.json()
            assert body["code"] == "ops_token_required"
            assert "COMPAAS_OPS_TOKEN" in body["detail"]
            assert token not in resp.text
        ok = client.get(page, headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200, page
    # liveness stays open for probes; team routes still take team keys, not the ops token
    assert client.get("/healthz").status_code == 200
    resp = client.get("/v1/models", headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 401 and resp.json()["code"] == "invalid_api_key"


def test_a_short_ops_token_is_refused() -> None:
    with pytest.raises(ValidationError, match="COMPAAS_OPS_TOKEN"):
        Settings(ops_token="secret")
