"""The job report's page (app/report): a realistic finished job (the shape a prune → distill →
static INT8 job on the digits CNN returns, with the quality and measured_on blocks of issue #14),
real auto searches (tests/app/conftest.py) and a job with nothing yet, rendered without a
browser. Every string from the job is escaped; every section says when it has no data."""

from __future__ import annotations

import copy
from collections import Counter
from html.parser import HTMLParser
from typing import Any

import pytest

from app.report.render import content_security_policy, render_report, stylesheet

EVIL = '<script>alert("x")</script>'


def _metrics(size: int, p50: float, acc: float, **fidelity: Any) -> dict[str, Any]:
    return {
        "size_bytes": size,
        "size_zstd_bytes": size // 2,
        "params": 226570,
        "sparsity": 0.49,
        "macs": 2511360,
        "latency_ms_p50": p50,
        "accuracy_top1": acc,
        **fidelity,
    }


FIDELITY = {
    "agreement_top1": 0.9926,
    "cosine_similarity": 0.972,
    "sqnr_db": 9.19,
    "sqnr_db_min": 9.19,
    "sqnr_db_min_slice": "output 0",
}
QUALITY = {
    "verdict": "degraded",
    "measured": {"agreement_top1": 0.9926, "accuracy_drop": -0.0074},
    "floor": {"agreement_top1": 0.97, "accuracy_drop": 0.02},
}
MEASURED_ON = {
    "dataset": {"id": "ds_1", "sha256": "ab" * 32},
    "samples": 269,
    "runtime": "onnxruntime 1.22",
    "cpu": "Intel Xeon",
    "flags": ["avx2", "avx512_vnni"],
    "threads": 1,
    "batch": 1,
}


def finished_job() -> dict[str, Any]:
    original = _metrics(911311, 0.0573, 0.9851)
    final = {**_metrics(232477, 0.0538, 0.9926, **FIDELITY), "measured_on": MEASURED_ON}
    epochs = [
        {"epoch": 0.0, "held_out_accuracy_top1": 0.9926},
        {"epoch": 1.0, "loss": 0.85, "accuracy": 0.984, "agreement": 0.987},
        {"epoch": 2.0, "loss": 0.52, "accuracy": 0.987, "agreement": 0.990},
    ]
    variants = [
        {"name": "static_int8", "latency_ms_p50": 0.0550, "fidelity": {"sqnr_db_min": 42.5}},
        {"name": EVIL, "latency_ms_p50": 0.0541, "fidelity": {"sqnr_db_min": 27.2}},
        {"name": "static_int8_u8act", "latency_ms_p50": 0.0536, "fidelity": {"sqnr_db_min": 42.4}},
        {"name": "no_latency", "fidelity": {"sqnr_db_min": 40.0}},
    ]
    sensitivity = [
        {"layer": "node_linear_1", "measured": True, "sqnr_db": 42.99, "weight_noise_db": 44.2},
        {"layer": EVIL, "measured": True, "sqnr_db": 49.35, "weight_noise_db": 45.4},
        {"layer": "node_conv2d", "measured": False, "weight_noise_db": 51.0},
    ]
    steps = [
        {
            "index": 0,
            "op": "prune",
            "config": {"op": "prune", "sparsity": 0.5, "fine_tune_epochs": 2},
            "status": "succeeded",
            "metrics": {**_metrics(911287, 0.0576, 0.9926, **FIDELITY), "quality": QUALITY},
            "warnings": ["Pruned 50.0% of the weights of 4 layer(s) (magnitude)."],
            "details": {
                "fine_tune": [{"epoch": 1.0, "loss": 0.07}, {"epoch": 2.0, "loss": 0.035}],
                "layers": [{"name": "0", "sparsity": 0.5}, {"name": "2", "sparsity": 0.5}],
            },
        },
        {
            "index": 1,
            "op": "distill",
            "config": {"op": "distill", "epochs": 2},
            "status": "succeeded",
            "metrics": {**_metrics(911287, 0.0572, 0.9926, **FIDELITY), "quality": QUALITY},
            "warnings": [f"distill made the result worse {EVIL}"],
            "details": {"epochs": epochs, "best_epoch": 0},
        },
        {
            "index": 2,
            "op": "quantize",
            "config": {"op": "quantize", "mode": "static", "dtype": "int8", "sensitivity": True},
            "status": "succeeded",
            "metrics": {**final, "quality": {**QUALITY, "verdict": "ok"}},
            "warnings": [],
            "details": {"sensitivity": sensitivity, "variants": variants, "chosen": EVIL},
        },
    ]
    return {
        "id": "job_123",
        "model_id": "mdl_1",
        "dataset_id": "ds_1",
        "status": "succeeded",
        "preset": None,
        "evaluation": {"task": "classification", "holdout": 0.3},
        "steps": steps,
        "metrics": {
            "original": original,
            "final": final,
            "ratios": {"compression_ratio": 3.92, "speedup": 1.07, "accuracy_drop": -0.0074},
            "quality": QUALITY,
            "evaluation": {"eval_samples": 269},
        },
        "artifacts": [
            {
                "role": "checkpoint",
                "format": "onnx",
                "step_index": 0,
                "size_bytes": 911287,
                "sha256": "cd" * 32,
            },
            {
                "role": "final",
                "format": "onnx",
                "step_index": None,
                "size_bytes": 232477,
                "sha256": "ef" * 32,
                "verdict": "rejected",
            },
        ],
        "warnings": [f"job warning {EVIL}"],
        "error": None,
    }


class Tags(HTMLParser):
    """Counts start tags by name and by (name, class), and collects the text."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: Counter[str] = Counter()
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        for cls in (dict(attrs).get("class") or "").split():
            self.tags[f"{tag}.{cls}"] += 1

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_a_finished_job_renders_every_section() -> None:
    html = render_report(finished_job())
    tags = Tags(html)
    text = " ".join(" ".join(tags.text).split())
    # before/after: size, zstd, MACs, latency, accuracy + agreement, cosine → 7 pairs of bars
    assert tags.tags["svg.comparison"] == 7
    assert tags.tags["rect.bar-before"] == 7 and tags.tags["rect.bar-after"] == 7
    assert "3.92× smaller" in text
    # steps with verdicts (quality blocks inside each step's metrics)
    assert tags.tags["tr.step"] == 3
    assert tags.tags["span.degraded"] >= 2 and tags.tags["span.ok"] == 1
    # per-layer: quantize sensitivity (3 layers) and prune sparsity (2 layers)
    assert tags.tags["svg.hbars"] == 2
    assert tags.tags["rect.bar-measured"] == 2 and tags.tags["rect.bar-estimated"] == 1
    # variants: three with a latency are plotted, the chosen one marked; one listed as omitted
    assert tags.tags["circle.point"] == 3 and tags.tags["circle.chosen"] == 1
    assert "Not drawn: no_latency." in text
    # training: prune fine-tune loss; distill loss and quality (3 series)
    assert tags.tags["svg.lines"] == 3 and tags.tags["polyline.series"] == 5
    assert "Best epoch kept: 0." in text
    # warnings from the job and each step; the verdict; measured_on
    assert tags.tags["ul.warnings"] == 1 and "step 0 (prune)" in text
    assert "Quality verdict: degraded" in text
    assert "avx2, avx512_vnni" in text and "runtime onnxruntime 1.22" in text
    assert "No quality verdict" not in text and "measured_on" not in text
    # artifacts: the deliverable first, with its verdict
    assert tags.tags["tr.artifact"] == 2 and tags.tags["span.rejected"] == 1
    assert text.index("ef" * 32) < text.index("cd" * 32)


def test_everything_from_the_job_is_escaped() -> None:
    html = render_report(finished_job())
    assert "<script" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
    # the stylesheet is the only inline content, and the CSP allows exactly it
    assert html.count("<style>") == 1 and stylesheet() in html
    policy = content_security_policy()
    assert "default-src 'none'" in policy and "style-src 'sha256-" in policy


def test_no_external_reference() -> None:
    html = render_report(finished_job())
    for needle in ("http://", "https://", "src=", "href=", "@import", "url("):
        # the SVG namespace is an identifier, never fetched
        assert html.replace('xmlns="http://www.w3.org/2000/svg"', "").count(needle) == 0, needle


@pytest.mark.parametrize("status", ["queued", "failed"])
def test_a_job_without_results_says_so_in_every_section(status: str) -> None:
    job = {
        "id": "job_empty",
        "status": status,
        "steps": [],
        "metrics": None,
        "warnings": [],
        "error": {"code": "quality_below_floor", "detail": f"under the floor {EVIL}"}
        if status == "failed"
        else None,
    }
    html = render_report(job)
    tags = Tags(html)
    text = " ".join(" ".join(tags.text).split())
    assert tags.tags["svg"] == 0
    for message in (
        "No quality verdict was recorded",
        "No before/after measurements",
        "This job has no steps.",
        "No per-layer data in this job",
        "No variants in this job",
        "No training in this job",
        "No auto search in this job",
        "No warnings.",
        "No artifacts stored for this job.",
        "no `measured_on` block",
    ):
        assert message in text, message
    if status == "failed":
        assert "quality_below_floor" in text and "<script" not in html


def test_long_layer_lists_are_capped_and_say_so() -> None:
    job = finished_job()
    ranking = [
        {"layer": f"layer{i}", "measured": i < 40, "sqnr_db": 30.0 + i, "weight_noise_db": 40.0}
        for i in range(150)
    ]
    job["steps"][2]["details"]["sensitivity"] = ranking
    tags = Tags(render_report(job))
    text = " ".join(" ".join(tags.text).split())
    assert tags.tags["rect.bar-measured"] == 40 and tags.tags["rect.bar-estimated"] == 20
    assert "Not drawn: 90 less sensitive layer(s)." in text


def test_partial_and_odd_values_do_not_break_the_page() -> None:
    job = finished_job()
    broken = copy.deepcopy(job)
    step = broken["steps"][2]
    step["details"]["variants"] = [{"name": "v", "latency_ms_p50": "fast", "fidelity": None}]
    step["details"]["sensitivity"] = [{"layer": "x", "measured": True, "sqnr_db": None}]
    step["metrics"]["quality"] = "not a block"
    broken["metrics"]["final"]["latency_ms_p50"] = None
    broken["metrics"]["original"]["macs"] = float("nan")
    tags = Tags(render_report(broken))
    text = " ".join(" ".join(tags.text).split())
    assert tags.tags["circle.point"] == 0 and "No variants in this job" not in text
    assert "1 variant(s) recorded, none with both a latency and a fidelity figure" in text
    assert tags.tags["tr.step"] == 3
    assert "not measured" in text  # the result's latency, the original's MACs


def test_the_templates_ship_in_the_package() -> None:
    """A `pip install .` (the api image) carries every template file: pyproject's package-data
    names them."""
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = data["package-data"]["app.report"]
    shipped = sorted(p.name for p in (root / "app/report/templates").iterdir())
    assert "report.html.j2" in shipped and "report.css" in shipped
    for name in shipped:
        assert any(fnmatch.fnmatch(f"templates/{name}", pat) for pat in patterns), name


def _text(tags: Tags) -> str:
    return " ".join(" ".join(tags.text).split())


def _chart(html: str) -> Tags:
    """The tags of the auto search's chart alone (the legend's keys use the same classes)."""
    start = html.index('<svg class="chart pareto"')
    return Tags(html[start : html.index("</svg>", start)])


def _marks(chart: Tags) -> int:
    """Candidate marks in the auto chart: a filled circle (meets) or a hollow square (misses)."""
    return chart.tags["circle.cand"] + chart.tags["rect.cand"]


def test_an_auto_job_shows_its_search(auto_jobs: dict[str, dict[str, Any]]) -> None:
    job = auto_jobs["met"]
    details = job["steps"][0]["details"]
    html = render_report(job)
    tags, text, chart = Tags(html), _text(Tags(html)), _chart(html)
    candidates = details["candidates"]
    measured = [c for c in candidates if c["status"] == "measured"]
    assert tags.tags["svg.pareto"] == 1 and _marks(chart) == len(measured)
    assert chart.tags["circle.meets"] == sum(c["meets"] for c in measured)
    assert chart.tags["rect.misses"] == sum(not c["meets"] for c in measured)
    # the delivered point: marked, ringed, labelled; its row marked too
    chosen = details["chosen"]
    assert chart.tags["circle.chosen"] + chart.tags["rect.chosen"] == 1
    assert chart.tags["circle.cand-ring"] == 1
    assert f"{chosen['candidate']}: {chosen['name']} (delivered)" in _text(chart)
    assert f"Delivered: candidate {chosen['candidate']} ({chosen['name']})" in text
    assert tags.tags["tr.chosen"] == 1 and "← delivered" in text
    assert chart.tags["polyline.front"] == 1  # the front's step line
    assert chart.tags["line.bound"] == 1  # max_accuracy_drop, on y
    # the legend tells the marks apart by shape and fill, not colour alone
    assert "meets the budget" in text and "misses it (hollow square)" in text
    assert "max_accuracy_drop 0.02" in text
    # every candidate has a row; a skipped one says why, a measured one its figures
    assert tags.tags["tr.candidate"] == len(candidates)
    assert tags.tags["tr.skipped"] == sum(c["status"] == "skipped" for c in candidates) >= 1
    for c in candidates:
        assert c["name"] in text
        if c["status"] == "skipped":
            assert c["reason"] in text
        elif not c["meets"]:
            assert "missed: " + "; ".join(c["missed"]) in text
    assert "drop 0.00 points" in text and "meets the budget" in text
    search = details["search"]
    assert f"stopped {search['stopped']}" in text and f"catalog {search['catalog']}" in text
    assert "The original model was delivered unchanged" not in text
    assert "No auto search in this job" not in text


def test_an_auto_job_that_delivered_the_original_says_so(
    auto_jobs: dict[str, dict[str, Any]],
) -> None:
    job = auto_jobs["impossible"]
    details = job["steps"][0]["details"]
    html = render_report(job)
    tags, text, chart = Tags(html), _text(Tags(html)), _chart(html)
    assert details["chosen"] == {"candidate": None, "name": "original"}
    assert tags.tags["p.warning"] == 1
    assert "The original model was delivered unchanged: no measured candidate met" in text
    assert "(preset fp16), which missed size " in text  # the closest, and what it missed
    assert chart.tags["circle.chosen"] + chart.tags["rect.chosen"] == 0
    assert chart.tags["circle.cand-ring"] == 0
    assert "(delivered)" not in text and tags.tags["tr.chosen"] == 0
    measured = [c for c in details["candidates"] if c["status"] == "measured"]
    assert _marks(chart) == chart.tags["rect.misses"] == len(measured)
    assert chart.tags["line.bound"] == 2  # max_size_bytes on x, max_accuracy_drop on y
    assert "log scale" in text
    skipped = [c for c in details["candidates"] if c["status"] == "skipped"]
    assert skipped and all(c["reason"] in text for c in skipped)
    # the engine's warning, under the step it came from
    assert "No candidate met the whole budget" in text


def test_an_auto_search_without_measurements_says_so(
    auto_jobs: dict[str, dict[str, Any]],
) -> None:
    partial = copy.deepcopy(auto_jobs["met"])
    measured = [
        c for c in partial["steps"][0]["details"]["candidates"] if c["status"] == "measured"
    ]
    measured[0]["fidelity"] = None  # e.g. an SQNR of identical outputs: infinite, not drawn
    html = render_report(partial)
    assert _marks(_chart(html)) == len(measured) - 1
    assert f"Not drawn: {measured[0]['name']} (accuracy_drop not finite: —)." in _text(Tags(html))
    job = copy.deepcopy(auto_jobs["impossible"])
    details = job["steps"][0]["details"]
    for c in details["candidates"]:
        if c["status"] == "measured":
            c.update(status="failed", error="nothing_to_share: no weights", meets=None)
    details["search"].update(measured=0, failed=1)
    tags = Tags(render_report(job))
    text = _text(tags)
    assert tags.tags["svg.pareto"] == 0
    assert "No candidate was measured (8 skipped, 1 failed: see the table)" in text
    assert "nothing_to_share: no weights" in text
    assert tags.tags["tr.candidate"] == len(details["candidates"])
    job["steps"][0]["details"] = None  # an auto step that never finished
    text = _text(Tags(render_report(job)))
    assert "The auto step recorded no candidates" in text
    assert "records no delivered model" in text


def test_an_auto_search_escapes_what_it_shows(auto_jobs: dict[str, dict[str, Any]]) -> None:
    job = copy.deepcopy(auto_jobs["met"])
    details = job["steps"][0]["details"]
    measured = next(c for c in details["candidates"] if c["status"] == "measured")
    skipped = next(c for c in details["candidates"] if c["status"] == "skipped")
    measured["name"] = EVIL
    skipped["reason"] = EVIL
    details["chosen"] = {"candidate": measured["index"], "name": EVIL}
    details["search"]["stopped"] = EVIL
    details["budget"] = {**details["budget"], EVIL: 1.0}
    html = render_report(job)
    assert "<script" not in html
    escaped = "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;"
    # the point's label and tooltip, the delivered line, the row, the reason, the summary …
    assert html.count(escaped) >= 6
    text = _text(Tags(html))
    assert f"{measured['index']}: {EVIL} (delivered)" in text
