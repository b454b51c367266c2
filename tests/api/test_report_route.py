"""GET /v1/jobs/{id}/report in process (no worker): a queued job's page says in every section
that nothing is measured yet; another team's job and an unknown id are a problem+json 404."""

from __future__ import annotations

from typing import Any

from tests.conftest import Stack, problem


def test_a_queued_jobs_report_is_a_self_contained_page(
    api_stack: Stack,
    api_team: dict[str, str],
    api_other_team: dict[str, str],
    api_digits: dict[str, dict[str, Any]],
) -> None:
    body = {
        "model_id": api_digits["onnx"]["id"],
        "pipeline": [{"op": "quantize", "mode": "dynamic", "dtype": "int8"}],
        "evaluation": {"task": "classification"},
    }
    created = api_stack.client.post("/v1/jobs", json=body, headers=api_team)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    try:
        resp = api_stack.client.get(f"/v1/jobs/{job_id}/report", headers=api_team)
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("text/html")
        assert resp.headers["cache-control"] == "no-store"
        csp = resp.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "style-src 'sha256-" in csp
        page = resp.text
        assert f"Job <code>{job_id}</code>" in page and "queued" in page
        assert "No before/after measurements" in page and "<svg" not in page

        other = api_stack.client.get(f"/v1/jobs/{job_id}/report", headers=api_other_team)
        problem(other, 404, "not_found")
        missing = api_stack.client.get("/v1/jobs/nope/report", headers=api_team)
        problem(missing, 404, "not_found")
        assert api_stack.client.get(f"/v1/jobs/{job_id}/report").status_code == 401
    finally:
        api_stack.client.post(f"/v1/jobs/{job_id}/cancel", headers=api_team)
