"""Issue #16: /docs and /redoc load only this app's own assets, Swagger has an Authorize button
(a bearer `securitySchemes` on the authenticated routes), and /openapi.json documents errors as
the API really sends them: application/problem+json with the `Problem` schema, which real error
answers are validated against (schemathesis)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import schemathesis

from tests.conftest import PROBLEM, Stack, problem
from tests.security.limits_support import embedded

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}


@pytest.fixture(scope="module")
def document(api_stack: Stack) -> dict[str, Any]:
    response = api_stack.client.get("/openapi.json")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def test_authenticated_routes_carry_a_bearer_scheme(document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "API key",
        "description": schemes["ApiKey"]["description"],
    }
    assert schemes["OpsToken"]["scheme"] == "bearer"
    paths = document["paths"]
    assert paths["/v1/jobs"]["post"]["security"] == [{"ApiKey": []}]
    assert paths["/v1/artifacts/{artifact_id}/download"]["get"]["security"] == [{"ApiKey": []}]
    # no COMPAAS_OPS_TOKEN here: /metrics takes the token, or nothing
    assert paths["/metrics"]["get"]["security"] == [{"OpsToken": []}, {}]
    assert list(schemes) == ["ApiKey", "OpsToken"]  # Swagger's Authorize lists teams' first
    for open_route in ("/healthz", "/v1/keys", "/v1/methods"):
        assert "security" not in paths[open_route]["get"], open_route
    secured = [op for item in paths.values() for op in item.values() if op.get("security")]
    assert len(secured) >= 15
    assert all("401" in op["responses"] for op in secured)


def test_every_error_response_is_problem_json(document: dict[str, Any]) -> None:
    checked = 0
    for path, item in document["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert "default" in responses, (method, path)
            for status, response in responses.items():
                if status == "default" or status[0] in "45":
                    assert response["content"] == {PROBLEM: {"schema": PROBLEM_REF}}, (
                        method,
                        path,
                        status,
                    )
                    checked += 1
    assert checked > 40
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    problem_schema = schemas["Problem"]
    assert set(problem_schema["required"]) == {"type", "title", "status", "code", "detail"}
    assert {"field", "instance", "errors", "input"} <= set(problem_schema["properties"])
    assert problem_schema["additionalProperties"] is True
    assert "HTTPValidationError" not in str(document)


@pytest.mark.slow  # 3.6 s: schemathesis loads and resolves the whole document
def test_real_error_answers_match_the_documented_problem(
    api_stack: Stack, api_team: dict[str, str]
) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", api_stack.client.app)
    client = api_stack.client
    missing = "01900000-0000-7000-8000-000000000000"
    answers = [
        ("/v1/models", "GET", client.get("/v1/models"), 401, "unauthorized"),
        (
            "/v1/jobs",
            "POST",
            client.post("/v1/jobs", json={"model_id": 3, "bogus": 1}, headers=api_team),
            422,
            "validation_error",
        ),
        (
            "/v1/jobs",
            "GET",
            client.get("/v1/jobs?limit=0", headers=api_team),
            422,
            "validation_error",
        ),
        (
            "/v1/jobs/{job_id}",
            "GET",
            client.get(f"/v1/jobs/{missing}", headers=api_team),
            404,
            "not_found",
        ),
        (
            "/v1/artifacts/{artifact_id}/download",
            "GET",
            client.get(f"/v1/artifacts/{missing}/download", headers=api_team),
            404,
            "not_found",
        ),
    ]
    for path, method, response, status, code in answers:
        body = problem(response, status, code)
        schema[path][method].validate_response(response)  # raises on any mismatch
        assert body["instance"] == response.request.url.path
    # the 422 lists every invalid part, in the documented shape
    errors = problem(answers[1][2], 422, "validation_error")["errors"]
    fields = {e["field"] for e in errors}
    assert "bogus" in fields and any(f.startswith("model_id") for f in fields), fields
    # a documented problem that lacks a required member fails the same validation
    bad = answers[3][2]
    bad._content = bad.content.replace(b'"code"', b'"kode"')  # noqa: SLF001
    with pytest.raises(Exception, match="code"):
        schema["/v1/jobs/{job_id}"]["GET"].validate_response(bad)


def test_artifact_404_names_where_artifacts_are_listed(
    api_stack: Stack, api_team: dict[str, str]
) -> None:
    missing = "01900000-0000-7000-8000-000000000000"
    for suffix in ("", "/download", "/provenance"):
        response = api_stack.client.get(f"/v1/artifacts/{missing}{suffix}", headers=api_team)
        detail = problem(response, 404, "not_found")["detail"]
        assert "GET /v1/artifacts" not in detail
        assert "GET /v1/jobs/{job_id}" in detail and "artifacts" in detail


def _local_assets(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


@pytest.mark.parametrize(("page", "expected"), [("/docs", 3), ("/redoc", 2)])
def test_docs_pages_load_only_their_own_assets(api_stack: Stack, page: str, expected: int) -> None:
    response = api_stack.client.get(page)
    assert response.status_code == 200
    html = response.text
    assert not re.search(r"https?://", html), "the page names another host"
    assets = _local_assets(html)
    assert len(assets) == expected and all(a.startswith("/docs/assets/") for a in assets)
    types = {"js": "text/javascript", "css": "text/css", "png": "image/png"}
    for url in assets:
        asset = api_stack.client.get(url)
        assert asset.status_code == 200, url
        assert asset.headers["content-type"].startswith(types[url.rsplit(".", 1)[1]]), url
        assert len(asset.content) > 1000
    csp = response.headers["content-security-policy"]
    assert "http" not in csp and "'unsafe-eval'" not in csp
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"].split()[0] == "'self'"
    assert directives["connect-src"] == "'self'"


def test_swagger_is_configured_for_the_authorize_button(api_stack: Stack) -> None:
    html = api_stack.client.get("/docs").text
    assert "url: '/openapi.json'" in html
    assert '"persistAuthorization": true' in html
    assert '"validatorUrl": null' in html  # no badge fetched from validator.swagger.io


def test_only_the_bundled_files_are_served(api_stack: Stack) -> None:
    for name in ("core.py", "__init__.py", "..%2Fcore.py", "LICENSE"):
        problem(api_stack.client.get(f"/docs/assets/{name}"), 404, "not_found")


@pytest.mark.slow  # 3.7 s: a deployment of its own, its first team made by the CLI
def test_with_an_ops_token_the_pages_assets_and_metrics_need_it(tmp_path: Path) -> None:
    token = "t" * 40
    with embedded(tmp_path, ops_token=token) as stack:
        ops = {"Authorization": f"Bearer {token}"}
        for url in ("/docs", "/docs/assets/swagger-ui-bundle.js", "/openapi.json"):
            problem(stack.client.get(url), 401, "ops_token_required")
            assert stack.client.get(url, headers=ops).status_code == 200, url
        document = stack.client.get("/openapi.json", headers=ops).json()
        assert document["paths"]["/metrics"]["get"]["security"] == [{"OpsToken": []}]
