"""Issue #16 item 3: the dashboard driven in a real headless Chromium (Debian's `chromium`
through Playwright) against `compaas up` (uvicorn + a Celery worker on SQLite), as a person
would use it: sign in with an API key, upload the digits CNN and its dataset, start an
`edge-int8` job, watch its progress bar reach 100 % live from the event stream, see the job
page's plots, download the artifact and check its bytes against the API's sha256, compare jobs.
No console error, no page error, no request to any host but the app. A screenshot of every page
goes to $COMPAAS_UI_SCREENSHOTS (default: the test's tmp dir)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, running_up
from tests.e2e.browser import CHROMIUM, watch

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's chromium at /usr/bin/chromium (bash .ci/setup installs it)",
    ),
]


@pytest.fixture
def compaas_up(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """`compaas up` on a free port in a fresh directory; its URL, a team's API key, its dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPAAS_")}
    env["PYTHONPATH"] = str(ROOT)
    with running_up([sys.executable, "-m", "app.cli"], tmp_path, env) as up:
        made = subprocess.run(
            [sys.executable, "-m", "app.cli", "admin", "create-team", "dashboard", "--json"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        yield up.api, json.loads(made.stdout)["api_key"], up.log


def test_the_dashboard_in_chromium(
    compaas_up: tuple[str, str, Path], digits_files: dict[str, Path], tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    api, key, log_path = compaas_up
    shots = Path(os.environ.get("COMPAAS_UI_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    requests: list[str] = []
    problems: list[str] = []
    seen: dict[str, Any] = {}
    started = time.monotonic()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            context = browser.new_context(
                accept_downloads=True, viewport={"width": 1200, "height": 900}
            )
            page = context.new_page()
            page.set_default_timeout(60_000)
            watch(page, requests, problems)

            def shot(name: str) -> None:
                page.screenshot(path=str(shots / f"{name}.png"), full_page=True)

            # GET / → /ui → sign in
            page.goto(f"{api}/")
            assert page.url.startswith(f"{api}/ui/login")
            shot("01-login")
            page.fill("#api-key", key)
            page.click("#sign-in")
            page.wait_for_url(f"{api}/ui")
            cookie = next(c for c in context.cookies() if c["name"] == "compaas_session")
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            assert page.evaluate("document.cookie") == ""  # no script can read the session

            # upload the model and the dataset; the page refreshes until the model is ready
            page.goto(f"{api}/ui/uploads")
            page.set_input_files("#model-file", str(digits_files["onnx"]))
            page.fill("#model-name", "digits")
            page.click("#model-upload button[type=submit]")
            page.wait_for_url("**/ui/uploads?uploaded_id=*")
            page.set_input_files("#dataset-file", str(digits_files["npz"]))
            page.click("#dataset-upload button[type=submit]")
            page.wait_for_url("**/ui/uploads?uploaded_id=*")
            page.wait_for_selector("tr.model[data-status=ready]", timeout=60_000)
            seen["ready_s"] = time.monotonic() - started
            model_id = page.get_attribute("tr.model", "data-id")
            shot("02-uploads")

            # a preset job on the digits dataset
            page.goto(f"{api}/ui/jobs/new?model_id={model_id}")
            page.check("#kind-preset")
            page.select_option("#preset-select", "edge-int8")
            # the builder is fed by GET /v1/methods: its op list is filled in
            page.wait_for_function(
                "() => document.querySelectorAll('#op-select option').length > 3"
            )
            # the builder: a step added from the schema's defaults becomes the pipeline JSON
            page.check("#kind-pipeline")
            page.select_option("#op-select", "quantize")
            page.click("#add-step")
            built = json.loads(page.input_value("#pipeline-json"))
            seen["built"] = built
            shot("03-new-job")
            page.check("#kind-preset")
            page.click("#start-job")
            page.wait_for_url("**/ui/jobs/*")
            job_id = page.url.rsplit("/", 1)[1]
            live = page.locator("#live")
            seen["status_at_load"] = live.get_attribute("data-status")
            seen["live"] = live.get_attribute("data-live")
            navigations: list[str] = []
            page.on("framenavigated", lambda f: navigations.append(f.url))
            page.wait_for_function(
                "() => document.querySelector('#live').dataset.progress !== undefined"
            )
            shot("04-job-running")
            # the bar reaches 100 % from the event stream, before the page reloads itself
            page.wait_for_function("() => document.getElementById('progress').value >= 100")
            seen["navigations_before_100"] = list(navigations)
            seen["job_s"] = time.monotonic() - started - seen["ready_s"]
            seen["progress_text"] = page.text_content("#progress-text")
            # the page reloads with the results
            page.wait_for_selector("section#downloads a.download.final", timeout=30_000)
            page.wait_for_load_state("load")
            counts = page.evaluate(
                """() => Object.fromEntries(['svg.chart', 'svg.comparison', 'svg.scatter',
                    'tr.step', 'tr.artifact', 'a.download', 'script:not([src])'
                ].map(s => [s, document.querySelectorAll(s).length]))"""
            )
            sizes = page.evaluate(
                """() => [...document.querySelectorAll('svg.chart')].map(s => {
                    const r = s.getBoundingClientRect(); return [r.width, r.height]; })"""
            )
            styled = page.evaluate(
                "() => getComputedStyle(document.querySelector('rect.bar-after')).fill"
            )
            shot("05-job-done")
            with page.expect_download() as info:
                page.click("section#downloads a.download.final")
            download = info.value
            data = Path(download.path()).read_bytes()

            # the job list, filtered; the comparison chart
            page.goto(f"{api}/ui?status=succeeded")
            assert page.locator(f"tr.job a[href='/ui/jobs/{job_id}']").count() == 1
            shot("06-jobs")
            page.goto(f"{api}/ui?status=failed")
            assert page.locator("tr.job").count() == 0
            page.goto(f"{api}/ui/compare")
            compare_points = page.locator("svg.compare circle.job-point").count()
            shot("07-compare")
            page.click("#sign-out")
            page.wait_for_url("**/ui/login")
            context.close()
        finally:
            browser.close()
    wall = time.monotonic() - started

    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {key}"}) as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
        (final,) = [a for a in job["artifacts"] if a["role"] == "final"]
        head = client.get(f"/v1/artifacts/{final['id']}/download")
    assert job["status"] == "succeeded", (job["error"], log_path.read_text()[-3000:])
    assert job["preset"] == "edge-int8" and job["model_id"] == model_id
    digest = hashlib.sha256(data).hexdigest()
    assert digest == final["sha256"] == head.headers["x-checksum-sha256"]
    assert data == head.content and len(data) == final["size_bytes"]

    print(
        f"\ndashboard e2e: {wall:.1f} s in the browser (model ready after {seen['ready_s']:.1f} s,"
        f" job at 100 % {seen['job_s']:.1f} s later); screenshots in {shots}"
    )
    assert problems == [], problems
    outside = [u for u in requests if not u.startswith(f"{api}/") and not u.startswith("data:")]
    assert outside == [], outside
    # progress was followed live: the page was opened before the job finished and reached
    # 100 % without navigating
    assert seen["status_at_load"] in ("queued", "running") and seen["live"] == "1"
    assert seen["navigations_before_100"] == [], seen
    assert seen["progress_text"] == "100 %"
    assert f"{api}/v1/jobs/{job_id}/events" in requests
    # the job page's plots: the before/after bars and the variants tried, laid out
    assert counts["svg.comparison"] >= 5 and counts["svg.scatter"] == 1, counts
    assert counts["tr.step"] == 1 and counts["tr.artifact"] == len(job["artifacts"])
    assert counts["script:not([src])"] == 0
    assert all(w > 100 and h > 30 for w, h in sizes), sizes
    assert styled == "rgb(43, 108, 176)"  # the report's stylesheet, served by the app
    assert compare_points >= 1
    (step,) = seen["built"]
    assert step["op"] == "quantize" and step["dtype"] == "int8" and "version" not in step
    assert sorted(f.name for f in shots.glob("*.png")) == [
        "01-login.png",
        "02-uploads.png",
        "03-new-job.png",
        "04-job-running.png",
        "05-job-done.png",
        "06-jobs.png",
        "07-compare.png",
    ]
