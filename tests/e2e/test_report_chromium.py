"""Issue #14 part 3: the job report opened in a real headless Chromium (Debian's `chromium`,
installed by .ci/setup) through Playwright. A real job on the digits CNN through the API and a
worker — prune with a fine-tune, distill, then static INT8 with a measured sensitivity ranking —
so every plot has data. The page is served to the browser exactly as the API answered it
(status, headers with their Content-Security-Policy, body); it must render its charts with no
console error, no page error and no request beyond the page itself."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from engine.quality import step_warnings
from tests.conftest import Stack
from tests.e2e.browser import CHROMIUM, watch
from tests.integration.methods import Client

# the page is served from a potentially trustworthy origin, as `compaas up` (127.0.0.1) or an
# https deployment serves it: on any other, Chromium logs that it ignored the COOP header
PAGE_URL = "http://localhost/v1/jobs/report"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's chromium at /usr/bin/chromium (bash .ci/setup installs it)",
    ),
]

PIPELINE: list[dict[str, Any]] = [
    {"op": "prune", "sparsity": 0.5, "fine_tune_epochs": 2},
    {"op": "distill", "epochs": 2},
    {"op": "quantize", "mode": "static", "dtype": "int8", "sensitivity": True},
]


@pytest.fixture(scope="module")
def finished(sqlite_stack: Stack, digits_files: dict[str, Path]) -> tuple[Client, dict[str, Any]]:
    _, headers = sqlite_stack.new_team("report")
    api = Client(sqlite_stack, headers)
    job = api.run(
        digits_files["pt2"],
        digits_files["npz"],
        pipeline=PIPELINE,
        evaluation={"task": "classification", "holdout": 0.3},
    )
    return api, job


def _open(html: str, headers: dict[str, str], shot: Path) -> dict[str, Any]:
    """Load the page in headless Chromium at PAGE_URL with the API's headers; every other
    request is refused and recorded. Counts of the chart elements, the console's errors and a
    full-page screenshot."""
    from playwright.sync_api import Route, sync_playwright

    requests: list[str] = []
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            watch(page, requests, problems)

            def serve(route: Route) -> None:
                if route.request.url == PAGE_URL:
                    route.fulfill(status=200, headers=headers, body=html)
                else:
                    route.abort()

            page.route("**/*", serve)
            response = page.goto(PAGE_URL, wait_until="load")
            assert response is not None and response.ok
            counts = page.evaluate(
                """() => Object.fromEntries([
                    'svg.chart', 'svg.comparison', 'rect.bar-before', 'rect.bar-after',
                    'svg.hbars', 'rect.bar-measured', 'rect.bar-sparsity', 'svg.scatter',
                    'circle.point', 'circle.point.chosen', 'svg.lines', 'polyline.series',
                    'tr.step', 'tr.artifact', 'ul.warnings li', 'script', 'img', 'link',
                    'iframe'
                ].map(s => [s, document.querySelectorAll(s).length]))"""
            )
            sizes = page.evaluate(
                """() => [...document.querySelectorAll('svg.chart')].map(s => {
                    const r = s.getBoundingClientRect(); return [r.width, r.height]; })"""
            )
            chosen_box = page.locator("circle.point.chosen").first.bounding_box()
            styled = page.evaluate(
                "() => getComputedStyle(document.querySelector('rect.bar-after')).fill"
            )
            title = page.title()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    return {
        "counts": counts,
        "sizes": sizes,
        "chosen_box": chosen_box,
        "styled": styled,
        "title": title,
        "requests": requests,
        "problems": problems,
    }


def test_the_report_renders_in_chromium(
    finished: tuple[Client, dict[str, Any]], tmp_path: Path
) -> None:
    api, job = finished
    resp = api.stack.client.get(f"/v1/jobs/{job['id']}/report", headers=api.headers)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/html")
    # the API's own headers go to the browser: its CSP must let the page's style in, and
    # nothing else
    headers = {
        k: v
        for k, v in resp.headers.items()
        if k.lower() not in ("content-length", "content-encoding", "transfer-encoding")
    }
    shot = tmp_path / "report.png"
    seen = _open(resp.text, headers, shot)
    print(f"report screenshot: {shot}")
    keep = os.environ.get("COMPAAS_REPORT_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)

    assert seen["problems"] == [], seen["problems"]
    assert seen["requests"] == [PAGE_URL], seen["requests"]
    assert seen["title"] == f"compaas job {job['id']} — report"
    counts = seen["counts"]
    assert counts["script"] == counts["img"] == counts["link"] == counts["iframe"] == 0
    # before/after: size, zstd size, MACs, latency, accuracy, agreement, cosine
    assert counts["svg.comparison"] == 7
    assert counts["rect.bar-before"] == counts["rect.bar-after"] == 7
    # the three steps, each with its row
    assert counts["tr.step"] == 3
    # per-layer: prune's sparsity (4 layers of the CNN) and quantize's measured sensitivity
    assert counts["svg.hbars"] == 2 and counts["rect.bar-sparsity"] == 4
    ranking = job["steps"][2]["details"]["sensitivity"]
    assert counts["rect.bar-measured"] == sum(1 for e in ranking if e["measured"]) >= 1
    # the variants tried, the delivered one marked
    variants = job["steps"][2]["details"]["variants"]
    assert counts["svg.scatter"] == 1 and counts["circle.point"] == len(variants) >= 2
    assert counts["circle.point.chosen"] == 1
    # training curves: prune's fine-tune (loss, quality) and distill's (loss, quality)
    assert counts["svg.lines"] == 4 and counts["polyline.series"] >= 4
    # the job's list repeats its steps' warnings, labelled; the page shows each once
    labelled = set(step_warnings((s["index"], s["op"], s["warnings"]) for s in job["steps"]))
    own = [w for w in job["warnings"] if w not in labelled]
    warnings = sum(len(s["warnings"] or []) for s in job["steps"]) + len(own)
    assert counts["ul.warnings li"] == warnings
    assert counts["tr.artifact"] == len(job["artifacts"]) >= 2  # checkpoints and the final
    assert any(a["role"] == "final" for a in job["artifacts"])
    # every chart is laid out with a size, the chosen point is on screen, the CSS applied
    assert counts["svg.chart"] == len(seen["sizes"]) == 7 + 2 + 1 + 4
    assert all(w > 100 and h > 30 for w, h in seen["sizes"]), seen["sizes"]
    assert seen["chosen_box"] is not None and seen["chosen_box"]["width"] > 0
    assert seen["styled"] == "rgb(43, 108, 176)"  # --after: the stylesheet was not blocked
    assert shot.stat().st_size > 20_000
    # the page and the JSON agree on the job
    page = resp.text
    assert json.dumps(job["steps"][2]["details"]["chosen"])[1:-1] in page
