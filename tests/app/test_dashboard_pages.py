"""The dashboard's job and compare pages (app/ui) rendered without a server or browser from the
report tests' finished job: the report's sections and charts appear inside the page, download
buttons point at the artifacts, every string from the job is escaped, and the pages carry no
inline script or style (their CSP allows neither)."""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace
from typing import Any

from app.report import view
from app.ui import compare
from app.ui.web import CSP, render
from tests.app.test_report_render import EVIL, finished_job

VIEWER = SimpleNamespace(team=SimpleNamespace(name=f"team {EVIL}"), csrf="csrf-token-1")


def _job(**changes: Any) -> dict[str, Any]:
    job = copy.deepcopy(finished_job())
    # the JobRead fields the report fixture leaves out
    for field, value in {
        "id": "job-1",
        "model_id": "model-1",
        "dataset_id": "dataset-1",
        "preset": None,
        "status": "succeeded",
        "progress": 1.0,
        "created_at": "2026-12-01T05:00:00Z",
        "finished_at": "2026-12-01T05:01:00Z",
    }.items():
        job.setdefault(field, value)
    for i, artifact in enumerate(job["artifacts"]):
        artifact.setdefault("id", f"art-{i}")
    job.update(changes)
    return job


def _page(job: dict[str, Any]) -> str:
    resp = render(
        "job.html.j2",
        VIEWER,  # type: ignore[arg-type]
        job=job,
        report=view.build(job),
        terminal=job["status"] in ("succeeded", "failed", "canceled"),
        progress=round(100 * float(job.get("progress") or 0)),
    )
    assert resp.headers["content-security-policy"] == CSP
    return bytes(resp.body).decode()


def _no_inline_code(html: str) -> None:
    assert EVIL not in html
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/ui/static/ui.js" defer>']
    assert " style=" not in html and "<style" not in html
    assert re.search(r"\son[a-z]+=", html) is None  # no inline event handlers


def test_a_finished_job_page_has_the_report_plots_and_downloads() -> None:
    job = _job(progress=1.0)
    html = _page(job)
    _no_inline_code(html)
    assert html.count('<svg class="chart comparison"') == 7
    assert html.count('class="chart scatter"') == 1 and 'circle class="point chosen"' in html
    assert html.count('<tr class="step">') == len(job["steps"])
    for artifact in job["artifacts"]:
        assert f'href="/v1/artifacts/{artifact["id"]}/download" download' in html
    assert 'class="button download final"' in html
    assert 'value="100"' in html and "data-live" not in html  # finished: no stream opened
    assert f'href="/v1/jobs/{job["id"]}/report"' in html


def test_a_running_job_page_follows_the_stream_and_can_be_canceled() -> None:
    job = _job(status="running", progress=0.42, metrics=None, artifacts=[], finished_at=None)
    html = _page(job)
    _no_inline_code(html)
    assert 'data-live="1"' in html and f'data-events="/v1/jobs/{job["id"]}/events"' in html
    assert '<progress id="progress" max="100" value="42">' in html
    assert f'action="/ui/jobs/{job["id"]}/cancel"' in html
    assert '<input type="hidden" name="csrf" value="csrf-token-1">' in html
    assert 'id="downloads"' not in html


def test_an_auto_job_page_shows_the_search(auto_jobs: dict[str, dict[str, Any]]) -> None:
    """The job page includes the report's sections (report_sections.html.j2 with the report's
    view model), so a real auto search shows there as in the report: chart, table, summary."""
    job = copy.deepcopy(auto_jobs["met"])
    details = job["steps"][0]["details"]
    html = _page(job)
    _no_inline_code(html)  # the chart's look comes from /ui/static/report.css, not inline
    assert html.count('<svg class="chart pareto"') == 1 and 'id="auto"' in html
    assert html.count('<tr class="candidate ') == len(details["candidates"])
    assert f"{details['chosen']['name']} (delivered)" in html


def test_compare_plots_size_or_latency_against_fidelity() -> None:
    done = _job()
    other = _job(id="job-2", preset="fp16")
    other["metrics"]["final"] = {**done["metrics"]["final"], "size_bytes": 455000}
    running = _job(id="job-3", status="running", metrics=None)
    by_size = compare.compare([done, other, running], "size")
    assert [r.x for r in by_size.plotted] == [232477 / 1024, 455000 / 1024]
    assert by_size.y_title.startswith("top-1 agreement") and len(by_size.rows) == 3
    assert by_size.chart is not None and len(by_size.chart.points) == 2
    by_latency = compare.compare([done], "latency")
    assert [r.x for r in by_latency.plotted] == [done["metrics"]["final"]["latency_ms_p50"]]
    html = bytes(
        render(
            "compare.html.j2",
            VIEWER,  # type: ignore[arg-type]
            comparison=by_size,
            chosen=["job-2"],
            x_axes=list(compare.X_AXES),
        ).body
    ).decode()
    _no_inline_code(html)
    assert html.count('class="point job-point"') == 2 and html.count('<tr class="compared">') == 3
    assert compare.compare([running], "size").chart is None


def test_the_builders_defaults_are_valid_steps() -> None:
    """The pipeline builder (ui.js `defaultsOf`) fills a new step with every property's default
    from GET /v1/methods' schema (a required one without a default: its first example, such as
    auto's budget), except `op` and `version`: each such step parses as is."""
    import json

    from app.api.routes.catalog import list_methods
    from engine.config import OPS

    items = list_methods()["items"]
    assert {item["op"] for item in items} == set(OPS)
    for item in items:
        props = item["schema"]["properties"]
        step = {k: p["default"] for k, p in props.items() if "default" in p}
        step |= {
            k: p["examples"][0] for k, p in props.items() if "default" not in p and "examples" in p
        }
        step.pop("version", None)
        step["op"] = item["op"]
        OPS[item["op"]].model_validate(json.loads(json.dumps(step)))
