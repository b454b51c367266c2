"""What the job report shows, read out of a job as the API returns it (`JobRead` as JSON):
each section's data, or None where this job has none (the template says so). Tolerant of
absent or partial fields: a job that failed early, an op that records no details, or metrics
written before a field existed all still render."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.report import charts
from app.report.auto import AutoSearch, auto_searches
from app.report.charts import Comparison, Point, Series, finite
from app.report.values import as_dict, as_list, cell, text_of
from engine.quality import step_warnings

# (title, metric, unit, better) of the before/after bars
SIZE_AND_SPEED = [
    ("File size", "size_bytes", "bytes", "lower"),
    ("Size after zstd", "size_zstd_bytes", "bytes", "lower"),
    ("MACs per sample", "macs", "count", "lower"),
    ("Latency p50", "latency_ms_p50", "ms", "lower"),
]
ACCURACY = [
    ("Accuracy top-1", "accuracy_top1", "fraction", "higher"),
]
# Fidelity to the original: the original is its own reference (1.0 by definition).
FIDELITY_TO_ORIGINAL = [
    ("Agreement top-1", "agreement_top1", "fraction", "higher"),
    ("Cosine similarity", "cosine_similarity", "fraction", "higher"),
]
# Columns of the per-step table, in order: (header, metric, unit)
STEP_COLUMNS = [
    ("size", "size_bytes", "bytes"),
    ("zstd", "size_zstd_bytes", "bytes"),
    ("sparsity", "sparsity", "fraction"),
    ("p50", "latency_ms_p50", "ms"),
    ("acc. top-1", "accuracy_top1", "fraction"),
    ("agreement", "agreement_top1", "fraction"),
    ("cosine", "cosine_similarity", "plain"),
    ("SQNR min", "sqnr_db_min", "dB"),
]
# fidelity keys a variant may carry, in the order the scatter prefers them
VARIANT_FIDELITY = [
    ("sqnr_db_min", "worst-slice SQNR (dB)"),
    ("sqnr_db", "SQNR (dB)"),
    ("cosine_similarity", "cosine similarity"),
    ("agreement_top1", "top-1 agreement"),
]
MAX_LAYER_BARS = 60  # a per-layer chart draws at most this many layers (the first, by rank)
# ratios shown in the summary: (label, key, format)
RATIOS = [
    ("compression ratio", "compression_ratio", "{:.2f}×"),
    ("speedup (side by side)", "speedup", "{:.2f}×"),
    ("accuracy drop", "accuracy_drop", "points"),
]


@dataclass(frozen=True)
class Quality:
    verdict: str | None
    measured: list[tuple[str, str]]
    floor: list[tuple[str, str]]


def quality_of(*places: Any) -> Quality | None:
    """The first `quality` block among `places` (dicts that may hold one), flattened for a
    table; None where no block is present (a job from before verdicts existed)."""
    for place in places:
        block = as_dict(place).get("quality")
        if isinstance(block, dict):
            verdict = block.get("verdict")
            return Quality(
                str(verdict) if verdict is not None else None,
                [(str(k), text_of(v)) for k, v in as_dict(block.get("measured")).items()],
                [(str(k), text_of(v)) for k, v in as_dict(block.get("floor")).items()],
            )
    return None


def measured_on(metrics: Any) -> list[tuple[str, str]]:
    """A metrics block's `measured_on` as (key, text) rows; nested values as compact text."""
    return [(str(k), text_of(v)) for k, v in as_dict(as_dict(metrics).get("measured_on")).items()]


@dataclass(frozen=True)
class StepRow:
    index: int
    op: str
    summary: str
    status: str
    verdict: str | None
    cells: list[str]
    warnings: list[str]
    measured_on: list[tuple[str, str]]


@dataclass(frozen=True)
class StepChart:
    """A chart that belongs to one step (and, for training curves, to one run in it)."""

    step: int
    op: str
    title: str
    chart: Any
    note: str = ""
    omitted: list[str] = field(default_factory=list)


def _summary(config: Any) -> str:
    """The step's config, short: `key=value` of what is set."""
    parts = [
        f"{k}={v}"
        for k, v in as_dict(config).items()
        if k != "op" and v is not None and not isinstance(v, dict | list)
    ]
    return ", ".join(parts)


def step_rows(job: dict[str, Any]) -> list[StepRow]:
    rows: list[StepRow] = []
    for step in as_list(job.get("steps")):
        metrics = as_dict(step.get("metrics"))
        quality = quality_of(step, metrics)
        rows.append(
            StepRow(
                int(step.get("index", len(rows))),
                str(step.get("op", "?")),
                _summary(step.get("config")),
                str(step.get("status", "?")),
                quality.verdict if quality else None,
                [cell(metrics.get(key), unit) for _, key, unit in STEP_COLUMNS],
                [str(w) for w in as_list(step.get("warnings"))],
                measured_on(metrics),
            )
        )
    return rows


def comparisons(metrics: dict[str, Any]) -> list[charts.ComparisonChart]:
    """Before/after bars of size, MACs, latency and fidelity for the metrics both sides have
    (or the result has, for fidelity to the original); empty without a final measurement."""
    original, final = as_dict(metrics.get("original")), as_dict(metrics.get("final"))
    if not final:
        return []
    out = []
    for title, key, unit, better in SIZE_AND_SPEED + ACCURACY:
        before, after = finite(original.get(key)), finite(final.get(key))
        if before is not None or after is not None:
            out.append(charts.comparison_chart(Comparison(title, before, after, unit, better)))
    for title, key, unit, better in FIDELITY_TO_ORIGINAL:
        after = finite(final.get(key))
        if after is not None:
            out.append(charts.comparison_chart(Comparison(title, 1.0, after, unit, better)))
    return out


def ratio_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    ratios = as_dict(metrics.get("ratios"))
    for label, key, fmt in RATIOS:
        value = finite(ratios.get(key))
        if value is None:
            continue
        text = f"{value * 100:+.1f} points" if fmt == "points" else fmt.format(value)
        basis = metrics.get("compression_basis")
        if key == "compression_ratio" and isinstance(basis, str):
            label += f" ({basis} file)"
        rows.append((label, text))
    sqnr = finite(as_dict(metrics.get("final")).get("sqnr_db_min"))
    if sqnr is not None:
        where = as_dict(metrics.get("final")).get("sqnr_db_min_slice")
        rows.append(("worst-slice SQNR", f"{sqnr:.1f} dB" + (f" ({where})" if where else "")))
    return rows


def sensitivity_charts(job: dict[str, Any]) -> list[StepChart]:
    """Per-layer charts from step details: quantize's measured sensitivity ranking (SQNR of the
    output with that layer alone quantized; the cheap weight-noise figure for layers not
    measured) and prune's per-layer sparsity."""
    out = []
    for step in as_list(job.get("steps")):
        details, index, op = as_dict(step.get("details")), int(step.get("index", 0)), step.get("op")
        ranking = [e for e in as_list(details.get("sensitivity")) if isinstance(e, dict)]
        if ranking:
            items, omitted = [], []
            for entry in ranking:
                measured = bool(entry.get("measured"))
                value = finite(entry.get("sqnr_db")) if measured else None
                value = value if value is not None else finite(entry.get("weight_noise_db"))
                name = str(entry.get("layer", "?"))
                if value is None:
                    omitted.append(name)
                    continue
                items.append((name, value, "measured" if measured else "estimated"))
            if len(items) > MAX_LAYER_BARS:
                omitted.append(f"{len(items) - MAX_LAYER_BARS} less sensitive layer(s)")
                items = items[:MAX_LAYER_BARS]
            if items:
                out.append(
                    StepChart(
                        index,
                        str(op),
                        "Per-layer quantization sensitivity",
                        charts.hbar_chart(items, "output SQNR with only this layer quantized (dB)"),
                        "Most sensitive first (lowest SQNR). Solid: measured; pale: estimated "
                        "from the layer's own weight rounding noise.",
                        omitted,
                    )
                )
        layers = [e for e in as_list(details.get("layers")) if isinstance(e, dict)]
        sparsity = [
            (str(e.get("name", "?")), finite(e.get("sparsity")), "sparsity") for e in layers
        ]
        kept = [(n, v, k) for n, v, k in sparsity if v is not None]
        more = [f"{len(kept) - MAX_LAYER_BARS} more layer(s)"] if len(kept) > MAX_LAYER_BARS else []
        kept = kept[:MAX_LAYER_BARS]
        if kept:
            out.append(
                StepChart(
                    index,
                    str(op),
                    "Per-layer sparsity",
                    charts.hbar_chart(kept, "fraction of weights pruned", lo=0.0),
                    "The share of each layer's weights this prune step removed.",
                    more,
                )
            )
    return out


def _fidelity_key(variants: list[dict[str, Any]]) -> tuple[str, str] | None:
    for key, title in VARIANT_FIDELITY:
        if any(finite(as_dict(v.get("fidelity")).get(key)) is not None for v in variants):
            return key, title
    return None


def variant_charts(job: dict[str, Any]) -> list[StepChart]:
    """Per quantize step: every variant built and measured, latency against fidelity (to the
    step's input, on samples held out of calibration), the delivered one marked."""
    out = []
    for step in as_list(job.get("steps")):
        details = as_dict(step.get("details"))
        variants = [v for v in as_list(details.get("variants")) if isinstance(v, dict)]
        if not variants:
            continue
        index, op, chosen = int(step.get("index", 0)), str(step.get("op")), details.get("chosen")
        found = _fidelity_key(variants)
        key, title = found if found is not None else ("", "")
        points, omitted = [], []
        for v in variants:
            x = finite(v.get("latency_ms_p50"))
            y = finite(as_dict(v.get("fidelity")).get(key)) if key else None
            name = str(v.get("name", "?"))
            if x is None or y is None:
                omitted.append(name)
            else:
                points.append(Point(name, x, y, name == chosen))
        note = f"Delivered: {chosen}." if chosen else "No variant is marked as delivered."
        chart = charts.scatter_chart(points, "latency p50 (ms)", title) if points else None
        out.append(StepChart(index, op, "Variants tried", chart, note, omitted))
    return out


def _histories(details: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Per-epoch rows a training step recorded: `epochs` (fine_tune, distill, QAT), a prune's
    `fine_tune` and the training of each of its `rounds`."""
    found: list[tuple[str, list[dict[str, Any]]]] = []

    def add(name: str, rows: Any) -> None:
        rows = [
            r for r in as_list(rows) if isinstance(r, dict) and finite(r.get("epoch")) is not None
        ]
        if rows:
            found.append((name, rows))

    add("training", details.get("epochs"))
    add("fine-tune", details.get("fine_tune"))
    add("QAT", as_dict(details.get("qat")).get("epochs"))
    for r in as_list(details.get("rounds")):
        if isinstance(r, dict):
            add(f"round {r.get('round', '?')}", r.get("training"))
    return found


def training_charts(job: dict[str, Any]) -> list[StepChart]:
    """Per training run: the loss per epoch, and the quality figures per epoch (training-set
    accuracy/agreement, the held-out figure that picks the best epoch; epoch 0 is the input)."""
    out = []
    for step in as_list(job.get("steps")):
        details = as_dict(step.get("details"))
        index, op = int(step.get("index", 0)), str(step.get("op"))
        best = finite(details.get("best_epoch"))
        for name, rows in _histories(details):
            keys = sorted({k for r in rows for k in r if k != "epoch"})
            series = {
                k: Series(
                    k,
                    [
                        (float(r["epoch"]), float(r[k]))
                        for r in rows
                        if finite(r.get(k)) is not None
                    ],
                )
                for k in keys
            }
            note = (
                f"Best epoch kept: {int(best)}." if best is not None and name == "training" else ""
            )
            loss = [s for k, s in series.items() if k == "loss" and s.points]
            quality = [s for k, s in series.items() if k != "loss" and s.points]
            if loss:
                out.append(
                    StepChart(
                        index,
                        op,
                        f"Training loss ({name})",
                        charts.line_chart(loss, "epoch", "loss"),
                        note,
                    )
                )
            if quality:
                out.append(
                    StepChart(
                        index,
                        op,
                        f"Quality per epoch ({name})",
                        charts.line_chart(quality, "epoch", "fraction / score"),
                        note,
                    )
                )
    return out


def all_warnings(job: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, text): the job's own warnings, then each step's (the job's list repeats the
    steps' ones, labelled: engine.quality.step_warnings; shown once, under their step)."""
    steps = [s for s in as_list(job.get("steps")) if isinstance(s, dict)]
    labelled = set(
        step_warnings(
            (s.get("index", "?"), s.get("op", "?"), as_list(s.get("warnings"))) for s in steps
        )
    )
    out = [("job", str(w)) for w in as_list(job.get("warnings")) if str(w) not in labelled]
    for step in steps:
        where = f"step {step.get('index', '?')} ({step.get('op', '?')})"
        out += [(where, str(w)) for w in as_list(step.get("warnings"))]
    return out


@dataclass(frozen=True)
class ArtifactRow:
    role: str
    format: str
    step: str
    size: str
    sha256: str
    verdict: str | None


def artifact_rows(job: dict[str, Any]) -> list[ArtifactRow]:
    """The job's files: the deliverables first, then each step's checkpoint; `verdict` where
    the artifact carries one (a `rejected` result stays downloadable, marked)."""
    rows = []
    for a in as_list(job.get("artifacts")):
        if not isinstance(a, dict):
            continue
        verdict = a.get("verdict") or as_dict(a.get("quality")).get("verdict")
        step = a.get("step_index")
        rows.append(
            ArtifactRow(
                str(a.get("role", "?")),
                str(a.get("format", "?")),
                "—" if step is None else str(step),
                cell(a.get("size_bytes"), "bytes"),
                str(a.get("sha256", "—")),
                str(verdict) if verdict else None,
            )
        )
    return sorted(rows, key=lambda r: (r.role != "final", r.step))


@dataclass(frozen=True)
class Report:
    job: dict[str, Any]
    status: str
    verdict: Quality | None
    error: dict[str, Any] | None
    ratios: list[tuple[str, str]]
    comparisons: list[charts.ComparisonChart]
    steps: list[StepRow]
    sensitivity: list[StepChart]
    variants: list[StepChart]
    auto: list[AutoSearch]
    training: list[StepChart]
    warnings: list[tuple[str, str]]
    artifacts: list[ArtifactRow]
    measured_on: list[tuple[str, list[tuple[str, str]]]]
    evaluation: list[tuple[str, str]]


def build(job: dict[str, Any]) -> Report:
    """The report's sections for `job` (a JobRead as JSON)."""
    metrics = as_dict(job.get("metrics"))
    blocks = [("original", metrics.get("original")), ("result", metrics.get("final"))]
    evaluation = [
        (str(k), cell(v, "plain"))
        for k, v in {**as_dict(job.get("evaluation")), **as_dict(metrics.get("evaluation"))}.items()
    ]
    return Report(
        job=job,
        status=str(job.get("status", "?")),
        verdict=quality_of(job, metrics),
        error=as_dict(job.get("error")) or None,
        ratios=ratio_rows(metrics),
        comparisons=comparisons(metrics),
        steps=step_rows(job),
        sensitivity=sensitivity_charts(job),
        variants=variant_charts(job),
        auto=auto_searches(job),
        training=training_charts(job),
        warnings=all_warnings(job),
        artifacts=artifact_rows(job),
        measured_on=[(name, measured_on(b)) for name, b in blocks if measured_on(b)],
        evaluation=evaluation,
    )
