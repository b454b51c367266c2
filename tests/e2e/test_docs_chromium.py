"""Issue #16: Swagger UI at /docs and ReDoc at /redoc in a real headless Chromium (Debian's
`chromium` through Playwright), served by uvicorn with the app's own headers and CSP. Offline:
every request goes to the app; no console error (a CSP violation is one). Swagger's Authorize
button takes a team key and "Try it out" then answers 200 with the team's models."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.browser import CHROMIUM, watch
from tests.security.limits_support import Embedded, embedded, served

LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's chromium at /usr/bin/chromium (bash .ci/setup installs it)",
    ),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    with embedded(tmp_path_factory.mktemp("docs-chromium")) as stack:
        key = _key(stack)
        with served(stack.settings) as url:
            yield url, key


def _key(stack: Embedded) -> str:
    return stack.new_team("docs")["Authorization"].removeprefix("Bearer ")


def _browse(url: str, shot: Path, act: Any) -> tuple[list[str], list[str], Any]:
    """Open `url` in headless Chromium, run `act(page)`; the requests made, the console's
    errors and warnings, page errors and failed requests, and what `act` returned."""
    from playwright.sync_api import sync_playwright

    requests: list[str] = []
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            watch(page, requests, problems)
            response = page.goto(url, wait_until="load")
            assert response is not None and response.ok
            result = act(page)
            page.screenshot(path=str(shot), full_page=False)
        finally:
            browser.close()
    return requests, problems, result


def _keep(shot: Path, name: str) -> None:
    print(f"{name} screenshot: {shot}")
    keep = os.environ.get("COMPAAS_DOCS_SCREENSHOT_DIR")
    if keep:
        shutil.copyfile(shot, Path(keep) / shot.name)


def test_swagger_authorizes_and_tries_a_route_offline(
    site: tuple[str, str], tmp_path: Path
) -> None:
    base, key = site

    def act(page: Any) -> dict[str, Any]:
        page.locator("button.authorize").first.click()
        dialog = page.locator(".dialog-ux .modal-ux")
        schemes = dialog.locator(".auth-container h4").all_inner_texts()
        api_key = dialog.locator(".auth-container", has_text="ApiKey")
        api_key.locator("input").fill(key)
        api_key.locator("button.modal-btn.auth.authorize").click()
        authorized = api_key.locator("button.modal-btn.auth").first.inner_text()
        dialog.locator("button.btn-done").first.click()
        operation = page.locator("#operations-models-list_models_v1_models_get")
        operation.locator(".opblock-summary").first.click()
        operation.locator("button.try-out__btn").click()
        operation.locator("button.execute").click()
        status = operation.locator(".live-responses-table .response .response-col_status").first
        status.wait_for(timeout=20_000)
        return {
            "schemes": schemes,
            "authorized": authorized,
            "status": status.inner_text().strip(),
            "body": operation.locator(".live-responses-table .microlight").first.inner_text(),
        }

    shot = tmp_path / "swagger.png"
    requests, problems, seen = _browse(f"{base}/docs", shot, act)
    _keep(shot, "swagger")
    assert not problems, problems
    assert all(r.startswith(base + "/") or r.startswith("data:") for r in requests), requests
    assert f"{base}/docs/assets/swagger-ui-bundle.js" in requests
    assert f"{base}/openapi.json" in requests
    assert any("ApiKey" in h for h in seen["schemes"]), seen["schemes"]
    assert seen["authorized"].strip().lower() == "logout"  # the key was taken
    assert seen["status"] == "200", seen
    assert '"items"' in seen["body"]


def test_redoc_renders_offline(site: tuple[str, str], tmp_path: Path) -> None:
    base, _ = site

    def act(page: Any) -> int:
        page.locator("h1").first.wait_for(timeout=20_000)
        count: int = page.locator("[data-section-id^='operation/']").count()
        return count

    shot = tmp_path / "redoc.png"
    requests, problems, operations = _browse(f"{base}/redoc", shot, act)
    _keep(shot, "redoc")
    # ReDoc's menu footer shows Redocly's logo from its CDN (no option turns it off): the CSP
    # blocks it before any connection, ReDoc hides the broken image; nothing else goes out.
    assert [r for r in requests if not r.startswith((base + "/", "data:", "blob:"))] == [LOGO]
    assert f"request failed: {LOGO}" in problems
    others = [p for p in problems if LOGO not in p]
    assert not others, others
    assert operations >= 15
