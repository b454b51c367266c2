"""Issue #10 item 6: security headers, Content-Disposition per RFC 6266/5987, no absolute paths.
Issue #16: the docs pages allow only this origin's assets."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import unquote

import pytest
from onnx import TensorProto, helper

from app.storage import get_blob_store
from tests.security.limits_support import Embedded, embedded, tiny_onnx
from worker.runner import inspect_model


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Embedded, dict[str, str]]]:
    with embedded(tmp_path_factory.mktemp("headers")) as stack:
        yield stack, stack.new_team("headers")


def _base_headers(headers: Mapping[str, str]) -> None:
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "no-referrer"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]


def test_every_kind_of_response_has_security_headers(
    stack: tuple[Embedded, dict[str, str]],
) -> None:
    s, team = stack
    answers = [
        s.client.get("/healthz"),
        s.client.get("/v1/models", headers=team),
        s.client.get("/v1/models"),  # 401 problem+json
        s.client.get("/v1/nothing-here"),  # 404 problem+json
        s.client.get("/openapi.json"),
    ]
    for response in answers:
        _base_headers(response.headers)
        assert response.headers["content-security-policy"].startswith("default-src 'none'")
        assert response.headers["cache-control"] == "no-store", response.request.url


def _script_hashes(csp: str) -> set[str]:
    return set(re.findall(r"'sha256-([A-Za-z0-9+/=]+)'", csp))


def test_docs_pages_allow_exactly_their_own_assets(stack: tuple[Embedded, dict[str, str]]) -> None:
    s, _ = stack
    docs = s.client.get("/docs")
    _base_headers(docs.headers)
    csp = docs.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["style-src"] == "'self'"
    sources = set(directives["script-src"].split())
    assert "'unsafe-inline'" not in sources and "'unsafe-eval'" not in sources
    # Swagger UI's one inline script is allowed by its hash, and nothing else inline is.
    inline = re.findall(r"<script>(.*?)</script>", docs.text, re.S)
    assert len(inline) == 1
    digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
    assert _script_hashes(csp) == {digest}
    assert sources == {"'self'", f"'sha256-{digest}'"}
    assets = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
    assert assets and all(src.startswith("/docs/assets/") for src in assets)

    redoc = s.client.get("/redoc")
    _base_headers(redoc.headers)
    csp = redoc.headers["content-security-policy"]
    assert "https:" not in csp and "http:" not in csp
    assert "script-src 'self';" in csp
    assets = re.findall(r'(?:src|href)="([^"]+)"', redoc.text)
    assert assets and all(src.startswith("/docs/assets/") for src in assets)


@pytest.mark.parametrize(
    "name",
    [
        "模型 v2",  # not Latin-1: a 500 before
        "line\r\nX-Injected: yes",  # CR/LF: an empty reply before
        'quote " back\\slash; 100% ü',
        "plain-name",
    ],
)
def test_download_names_are_encoded_per_rfc_6266(
    stack: tuple[Embedded, dict[str, str]], name: str
) -> None:
    s, team = stack
    data = tiny_onnx()
    upload = s.client.post(
        "/v1/models", files={"file": ("m.onnx", data)}, data={"name": name}, headers=team
    )
    assert upload.status_code == 201, upload.text
    model = upload.json()
    download = s.client.get(f"/v1/models/{model['id']}/download", headers=team)
    assert download.status_code == 200
    assert download.content == data
    assert "x-injected" not in download.headers
    disposition = download.headers["content-disposition"]
    assert disposition.isascii() and "\r" not in disposition and "\n" not in disposition
    match = re.fullmatch(
        r'attachment; filename="([^"\\]*)"; filename\*=UTF-8\'\'(\S+)', disposition
    )
    assert match, disposition
    fallback, encoded = match.groups()
    assert all(" " <= c <= "~" for c in fallback)
    assert unquote(encoded, encoding="utf-8") == f"{model['name']}.onnx"


def test_error_details_show_no_absolute_paths(stack: tuple[Embedded, dict[str, str]]) -> None:
    """onnxruntime names the file it loaded; the team sees its name, not the worker's paths."""
    s, team = stack
    graph = helper.make_graph(
        [helper.make_node("Foo", ["x"], ["y"], domain="com.evil")],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.evil", 1)]
    onnx_model = helper.make_model(graph, opset_imports=opsets)
    onnx_model.ir_version = 8
    files = {"file": ("custom.onnx", onnx_model.SerializeToString())}
    model = s.client.post("/v1/models", files=files, headers=team).json()
    inspect_model(model["id"], s.settings, get_blob_store(s.settings))

    read = s.client.get(f"/v1/models/{model['id']}", headers=team).json()
    detail = read["error"]["detail"]
    assert "Load model from model.onnx failed" in detail, detail
    job = s.client.post("/v1/jobs", json={"model_id": model["id"], "preset": "fp16"}, headers=team)
    assert job.status_code == 422
    for text in (detail, job.json()["detail"]):
        assert str(s.settings.data_dir.resolve()) not in text
        assert not re.search(r"(?<![\w:/.])/(?!v1/)[\w.-]+/", text), text


def test_upload_directory_is_not_named_in_problem_details(tmp_path: Path) -> None:
    """Any Problem built with a path (here: a storage error message) is rendered without it."""
    from app.api.problems import Problem

    problem = Problem(422, "x", f"cannot read {tmp_path / 'spool' / 'upload.bin'}: truncated")
    assert problem.body()["detail"] == "cannot read upload.bin: truncated"


def test_an_unexpected_500_still_carries_the_headers(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.security.limits_support import embedded_env, settings_for

    app = create_app(settings_for(embedded_env(tmp_path)))

    def boom() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/boom", boom)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")
    assert response.status_code == 500
    assert response.json()["code"] == "internal_error"
    _base_headers(response.headers)
