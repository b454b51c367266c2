"""The dashboard's sign-in (issue #16, app/ui): an API key exchanged for an HttpOnly,
SameSite=Strict session cookie whose hash is stored; CSRF tokens on every form that changes
something; the cookie accepted on /v1 only for the event stream, the report and downloads (safe
GETs), never on a state-changing route; everything scoped to the session's team. In process on
the embedded default (`api_stack`), each test with its own cookie jar."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db.models import UiSession
from app.db.repositories import TeamAdminRepository
from app.db.session import get_sessionmaker
from app.security import api_key_pepper, hash_api_key
from app.services import ui_sessions
from app.ui.web import CSP
from tests.conftest import Stack

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def _key(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


def _browser(stack: Stack, https: bool = False) -> TestClient:
    """A fresh cookie jar on the stack's app (the shared client's jar stays empty)."""
    base = "https://testserver" if https else "http://testserver"
    return TestClient(stack.client.app, base_url=base, follow_redirects=False)


def _sign_in(browser: TestClient, key: str) -> Any:
    form = browser.get("/ui/login")
    assert form.status_code == 200, form.text
    (csrf,) = CSRF.findall(form.text)
    return browser.post("/ui/login", data={"api_key": key, "csrf": csrf, "next": "/ui"})


def _csrf(browser: TestClient, page: str = "/ui") -> str:
    resp = browser.get(page)
    assert resp.status_code == 200, resp.text
    return CSRF.findall(resp.text)[0]


@pytest.fixture(scope="module")
def team_a(api_stack: Stack) -> dict[str, str]:
    return api_stack.new_team("ui-a")[1]


@pytest.fixture(scope="module")
def team_b(api_stack: Stack) -> dict[str, str]:
    return api_stack.new_team("ui-b")[1]


@pytest.fixture(scope="module")
def job_a(
    api_stack: Stack, team_a: dict[str, str], digits_files: dict[str, Path]
) -> dict[str, Any]:
    """A job of team A, canceled (so its event stream ends), made through the API."""
    model = api_stack.upload("models", digits_files["onnx"], team_a, name="digits").json()
    assert api_stack.inspect_here(model["id"], team_a)["status"] == "ready"
    body = {"model_id": model["id"], "pipeline": [{"op": "quantize", "dtype": "fp16"}]}
    job = api_stack.client.post("/v1/jobs", json=body, headers=team_a).json()
    assert api_stack.client.post(f"/v1/jobs/{job['id']}/cancel", headers=team_a).is_success
    return {"job": job, "model": model}


def test_csrf_token_is_bound_to_the_session_and_the_pepper() -> None:
    token, other = "t" * 43, "u" * 43
    csrf = ui_sessions.csrf_token(token, "pepper-1" * 4)
    assert ui_sessions.csrf_ok(token, "pepper-1" * 4, csrf)
    assert not ui_sessions.csrf_ok(other, "pepper-1" * 4, csrf)  # another session's token
    assert not ui_sessions.csrf_ok(token, "pepper-2" * 4, csrf)  # another deployment's
    assert not ui_sessions.csrf_ok(token, "pepper-1" * 4, "")
    assert not ui_sessions.csrf_ok(token, "pepper-1" * 4, None)
    # neither the CSRF token nor the stored hash is the cookie's token
    assert csrf != token and ui_sessions.token_hash(token, "pepper-1" * 4) not in (csrf, token)


def test_root_and_pages_send_a_browser_to_sign_in(api_stack: Stack) -> None:
    browser = _browser(api_stack)
    root = browser.get("/")
    assert root.status_code == 307 and root.headers["location"] == "/ui"
    for page in ("/ui", "/ui/uploads", "/ui/jobs/new", "/ui/compare", "/ui/jobs/x"):
        resp = browser.get(page)
        assert resp.status_code == 303, (page, resp.text)
        assert resp.headers["location"].startswith("/ui/login?next=" + page)
    login = browser.get("/ui/login")
    assert login.headers["content-security-policy"] == CSP
    assert "<script>" not in login.text and "style=" not in login.text
    assert re.findall(r"<script [^>]*src=\"([^\"]+)\"", login.text) == ["/ui/static/ui.js"]
    assert browser.get("/ui/static/ui.js").status_code == 200
    assert browser.get("/ui/static/report.css").headers["content-type"].startswith("text/css")


def test_sign_in_sets_an_httponly_strict_cookie_and_stores_only_its_hash(
    api_stack: Stack, team_a: dict[str, str]
) -> None:
    browser = _browser(api_stack)
    resp = _sign_in(browser, _key(team_a))
    assert resp.status_code == 303 and resp.headers["location"] == "/ui"
    cookie = next(
        c for c in resp.headers.get_list("set-cookie") if c.startswith("compaas_session=")
    )
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= flags
    assert "secure" not in flags  # plain http (127.0.0.1): a Secure cookie would not come back
    token = cookie.split(";")[0].split("=", 1)[1]
    with get_sessionmaker(api_stack.settings.database_url)() as session:
        hashes = set(session.scalars(select(UiSession.token_hash)))
    pepper = api_key_pepper(api_stack.settings)
    assert ui_sessions.token_hash(token, pepper) in hashes and token not in hashes
    page = browser.get("/ui")
    assert page.status_code == 200 and "ui-a" in page.text
    assert page.headers["content-security-policy"] == CSP

    secure = _browser(api_stack, https=True)
    resp = _sign_in(secure, _key(team_a))
    cookie = next(c for c in resp.headers.get_list("set-cookie") if "compaas_session=" in c)
    assert cookie.startswith("__Host-compaas_session=")
    assert "secure" in {p.strip().lower() for p in cookie.split(";")}
    assert secure.get("/ui").status_code == 200


def test_sign_in_refuses_bad_keys_and_forged_forms(
    api_stack: Stack, team_a: dict[str, str]
) -> None:
    browser = _browser(api_stack)
    bad = _sign_in(browser, "cmp_not-a-real-key")
    assert bad.status_code == 401 and "not valid" in bad.text
    assert "compaas_session" not in browser.cookies
    # a form posted from elsewhere has no login CSRF cookie: refused before the key is tried
    forged = _browser(api_stack).post(
        "/ui/login", data={"api_key": _key(team_a), "csrf": "guess", "next": "/ui"}
    )
    assert forged.status_code == 403 and "compaas_session" not in str(forged.headers)
    # a redirect after sign-in stays inside the dashboard
    ok = _browser(api_stack)
    form = ok.get("/ui/login")
    (csrf,) = CSRF.findall(form.text)
    resp = ok.post(
        "/ui/login", data={"api_key": _key(team_a), "csrf": csrf, "next": "https://evil.test/"}
    )
    assert resp.status_code == 303 and resp.headers["location"] == "/ui"


def test_forms_without_the_sessions_csrf_token_are_refused(
    api_stack: Stack, team_a: dict[str, str], team_b: dict[str, str], job_a: dict[str, Any]
) -> None:
    browser = _browser(api_stack)
    _sign_in(browser, _key(team_a))
    other = _browser(api_stack)
    _sign_in(other, _key(team_a))
    foreign = _csrf(other)  # the same team's other session
    mine = _csrf(browser)
    body = {"model_id": job_a["model"]["id"], "kind": "preset", "preset": "fp16"}
    tampered = mine[:-1] + ("1" if mine.endswith("0") else "0")  # always differs from mine
    for csrf in (None, "", foreign, tampered):
        data = {**body, **({"csrf": csrf} if csrf is not None else {})}
        resp = browser.post("/ui/jobs", data=data)
        assert resp.status_code == 403 and "csrf_rejected" in resp.text, resp.text
        assert browser.post(f"/ui/jobs/{job_a['job']['id']}/retry", data=data).status_code == 403
        assert browser.post("/ui/logout", data=data).status_code == 403
    files = {"file": ("d.npz", b"PK\x03\x04")}
    assert browser.post("/ui/datasets", data={"csrf": foreign}, files=files).status_code == 403
    # nothing was created, and the session still works
    jobs = api_stack.client.get("/v1/jobs", headers=team_a).json()["items"]
    assert [j["id"] for j in jobs] == [job_a["job"]["id"]]
    assert browser.get("/ui").status_code == 200

    made = browser.post("/ui/jobs", data={**body, "csrf": mine})
    assert made.status_code == 303, made.text
    job_id = made.headers["location"].rsplit("/", 1)[1]
    job = api_stack.client.get(f"/v1/jobs/{job_id}", headers=team_a).json()
    assert job["preset"] == "fp16" and job["model_id"] == job_a["model"]["id"]
    # the form's answer to an invalid pipeline names the field, and keeps what was typed
    bad = browser.post(
        "/ui/jobs", data={**body, "kind": "pipeline", "pipeline": "[{op", "csrf": mine}
    )
    assert bad.status_code == 422 and "invalid_pipeline" in bad.text and "[{op" in bad.text
    unknown = browser.post(
        "/ui/jobs",
        data={**body, "kind": "pipeline", "pipeline": '[{"op": "shrink"}]', "csrf": mine},
    )
    assert unknown.status_code == 422 and "shrink" in unknown.text
    assert api_stack.client.post(f"/v1/jobs/{job_id}/cancel", headers=team_a).is_success


def test_the_cookie_only_reads_on_v1_and_never_changes_anything(
    api_stack: Stack, team_a: dict[str, str], job_a: dict[str, Any]
) -> None:
    browser = _browser(api_stack)
    _sign_in(browser, _key(team_a))
    job_id, model_id = job_a["job"]["id"], job_a["model"]["id"]
    report = browser.get(f"/v1/jobs/{job_id}/report")
    assert report.status_code == 200 and job_id in report.text
    events = browser.get(f"/v1/jobs/{job_id}/events")
    assert events.status_code == 200 and "event: done" in events.text
    # every other /v1 route still wants the key: reads that are not the browser's own, and
    # every state-changing request (the cookie would be a CSRF hole there)
    refused = [
        browser.get("/v1/jobs"),
        browser.get(f"/v1/jobs/{job_id}"),
        browser.get(f"/v1/models/{model_id}"),
        browser.post(f"/v1/jobs/{job_id}/retry"),
        browser.post(f"/v1/jobs/{job_id}/cancel"),
        browser.post("/v1/jobs", json={"model_id": model_id, "preset": "fp16"}),
        browser.delete(f"/v1/models/{model_id}"),
        browser.post("/v1/datasets", files={"file": ("d.npz", b"PK")}),
    ]
    for resp in refused:
        assert resp.status_code == 401, (resp.request.method, resp.request.url, resp.text)
    assert api_stack.client.get(f"/v1/models/{model_id}", headers=team_a).status_code == 200
    assert api_stack.client.get(f"/v1/jobs/{job_id}", headers=team_a).json()["status"] == (
        "canceled"
    )


def test_a_session_sees_only_its_team(
    api_stack: Stack,
    team_a: dict[str, str],
    team_b: dict[str, str],
    job_a: dict[str, Any],
    digits_files: dict[str, Path],
) -> None:
    browser = _browser(api_stack)
    _sign_in(browser, _key(team_b))
    job_id = job_a["job"]["id"]
    assert browser.get(f"/ui/jobs/{job_id}").status_code == 404
    assert browser.get(f"/v1/jobs/{job_id}/report").status_code == 404
    assert browser.get(f"/v1/jobs/{job_id}/events").status_code == 404
    assert browser.get(f"/ui/compare?job={job_id}").status_code == 404
    assert job_id not in browser.get("/ui").text
    assert job_a["model"]["id"] not in browser.get("/ui/uploads").text
    csrf = _csrf(browser)
    assert browser.post(f"/ui/jobs/{job_id}/retry", data={"csrf": csrf}).status_code == 404
    made = browser.post(
        "/ui/jobs",
        data={"model_id": job_a["model"]["id"], "kind": "preset", "preset": "fp16", "csrf": csrf},
    )
    assert made.status_code == 422 and "No model with id" in made.text

    mine = _browser(api_stack)
    _sign_in(mine, _key(team_a))
    with digits_files["npz"].open("rb") as fh:
        up = mine.post(
            "/ui/datasets",
            data={"csrf": _csrf(mine), "name": "digits-ui"},
            files={"file": ("digits.npz", fh)},
        )
    assert up.status_code == 303, up.text
    dataset_id = up.headers["location"].split("uploaded_id=", 1)[1]
    listed = api_stack.client.get(f"/v1/datasets/{dataset_id}", headers=team_a).json()
    assert listed["name"] == "digits-ui" and listed["num_samples"] > 0
    assert dataset_id in mine.get("/ui/uploads").text
    assert dataset_id not in browser.get("/ui/uploads").text
    page = mine.get(f"/ui/jobs/{job_id}")
    assert page.status_code == 200 and 'id="progress"' in page.text
    assert f'data-events="/v1/jobs/{job_id}/events"' in page.text
    assert "<script>" not in page.text and "style=" not in page.text


def test_sign_out_and_revoking_the_key_end_the_session(
    api_stack: Stack, team_a: dict[str, str], job_a: dict[str, Any]
) -> None:
    browser = _browser(api_stack)
    _sign_in(browser, _key(team_a))
    token = browser.cookies["compaas_session"]
    out = browser.post("/ui/logout", data={"csrf": _csrf(browser)})
    assert out.status_code == 303 and out.headers["location"] == "/ui/login"
    assert (
        'compaas_session=""' in out.headers["set-cookie"]
        or "Max-Age=0" in out.headers["set-cookie"]
    )
    stale = _browser(api_stack)
    stale.cookies.set("compaas_session", token)
    assert stale.get("/ui").status_code == 303
    assert stale.get(f"/v1/jobs/{job_a['job']['id']}/report").status_code == 401

    # a key made for this test, revoked while its session is open
    team_id, headers = api_stack.new_team("ui-revoked")
    browser = _browser(api_stack)
    _sign_in(browser, _key(headers))
    assert browser.get("/ui").status_code == 200
    maker = get_sessionmaker(api_stack.settings.database_url)
    pepper = api_key_pepper(api_stack.settings)
    with maker() as session:
        repo = TeamAdminRepository(session)
        found = repo.key_for_hash(hash_api_key(_key(headers), pepper))
        assert found is not None and found[1].id == team_id
        repo.revoke_key(found[0], ui_sessions.utcnow())
        session.commit()
    assert browser.get("/ui").status_code == 303
