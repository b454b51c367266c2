"""What the job report shows, read out of a job as the API returns it (`JobRead` as JSON):
each section's data, or None where this job has none (the template says so). Tolerant of
absent or partial fields: a job that failed early, an op that records no details, or metrics
written before a field existed all still render."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from app.report import charts
from app.report.charts import Bound, Comparison, Point, Series, finite
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


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def text_of(value: Any) -> str:
    """Any JSON value as compact text: numbers as cells, dicts as `key: value` pairs, lists
    joined with commas."""
    if isinstance(value, dict):
        return ", ".join(f"{k}: {text_of(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(text_of(v) for v in value)
    return cell(value, "plain")


def cell(value: Any, unit: str) -> str:
    """A table cell: the formatted number, the text as is, or an em dash when absent."""
    number = finite(value)
    if number is None:
        return "—" if value is None or isinstance(value, int | float) else str(value)
    if unit == "plain":
        return f"{number:.4g}"
    return charts.format_value(number, unit)


@dataclass(frozen=True)
class Quality:
    verdict: str | None
    measured: list[tuple[str, str]]
    floor: list[tuple[str, str]]


def quality_of(*places: Any) -> Quality | None:
    """The first `quality` block among `places` (dicts that may hold one), flattened for a
    table; None where no block is present (a job from before verdicts existed)."""
    for place in places:
        block = _dict(place).get("quality")
        if isinstance(block, dict):
            verdict = block.get("verdict")
            return Quality(
                str(verdict) if verdict is not None else None,
                [(str(k), text_of(v)) for k, v in _dict(block.get("measured")).items()],
                [(str(k), text_of(v)) for k, v in _dict(block.get("floor")).items()],
            )
    return None


def measured_on(metrics: Any) -> list[tuple[str, str]]:
    """A metrics block's `measured_on` as (key, text) rows; nested values as compact text."""
    return [(str(k), text_of(v)) for k, v in _dict(_dict(metrics).get("measured_on")).items()]


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
        for k, v in _dict(config).items()
        if k != "op" and v is not None and not isinstance(v, dict | list)
    ]
    return ", ".join(parts)


def step_rows(job: dict[str, Any]) -> list[StepRow]:
    rows: list[StepRow] = []
    for step in _list(job.get("steps")):
        metrics = _dict(step.get("metrics"))
        quality = quality_of(step, metrics)
        rows.append(
            StepRow(
                int(step.get("index", len(rows))),
                str(step.get("op", "?")),
                _summary(step.get("config")),
                str(step.get("status", "?")),
                quality.verdict if quality else None,
                [cell(metrics.get(key), unit) for _, key, unit in STEP_COLUMNS],
                [str(w) for w in _list(step.get("warnings"))],
                measured_on(metrics),
            )
        )
    return rows


def comparisons(metrics: dict[str, Any]) -> list[charts.ComparisonChart]:
    """Before/after bars of size, MACs, latency and fidelity for the metrics both sides have
    (or the result has, for fidelity to the original); empty without a final measurement."""
    original, final = _dict(metrics.get("original")), _dict(metrics.get("final"))
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
    ratios = _dict(metrics.get("ratios"))
    for label, key, fmt in RATIOS:
        value = finite(ratios.get(key))
        if value is None:
            continue
        text = f"{value * 100:+.1f} points" if fmt == "points" else fmt.format(value)
        basis = metrics.get("compression_basis")
        if key == "compression_ratio" and isinstance(basis, str):
            label += f" ({basis} file)"
        rows.append((label, text))
    sqnr = finite(_dict(metrics.get("final")).get("sqnr_db_min"))
    if sqnr is not None:
        where = _dict(metrics.get("final")).get("sqnr_db_min_slice")
        rows.append(("worst-slice SQNR", f"{sqnr:.1f} dB" + (f" ({where})" if where else "")))
    return rows


def sensitivity_charts(job: dict[str, Any]) -> list[StepChart]:
    """Per-layer charts from step details: quantize's measured sensitivity ranking (SQNR of the
    output with that layer alone quantized; the cheap weight-noise figure for layers not
    measured) and prune's per-layer sparsity."""
    out = []
    for step in _list(job.get("steps")):
        details, index, op = _dict(step.get("details")), int(step.get("index", 0)), step.get("op")
        ranking = [e for e in _list(details.get("sensitivity")) if isinstance(e, dict)]
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
        layers = [e for e in _list(details.get("layers")) if isinstance(e, dict)]
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
        if any(finite(_dict(v.get("fidelity")).get(key)) is not None for v in variants):
            return key, title
    return None


def variant_charts(job: dict[str, Any]) -> list[StepChart]:
    """Per quantize step: every variant built and measured, latency against fidelity (to the
    step's input, on samples held out of calibration), the delivered one marked."""
    out = []
    for step in _list(job.get("steps")):
        details = _dict(step.get("details"))
        variants = [v for v in _list(details.get("variants")) if isinstance(v, dict)]
        if not variants:
            continue
        index, op, chosen = int(step.get("index", 0)), str(step.get("op")), details.get("chosen")
        found = _fidelity_key(variants)
        key, title = found if found is not None else ("", "")
        points, omitted = [], []
        for v in variants:
            x = finite(v.get("latency_ms_p50"))
            y = finite(_dict(v.get("fidelity")).get(key)) if key else None
            name = str(v.get("name", "?"))
            if x is None or y is None:
                omitted.append(name)
            else:
                points.append(Point(name, x, y, name == chosen))
        note = f"Delivered: {chosen}." if chosen else "No variant is marked as delivered."
        chart = charts.scatter_chart(points, "latency p50 (ms)", title) if points else None
        out.append(StepChart(index, op, "Variants tried", chart, note, omitted))
    return out


@dataclass(frozen=True)
class AutoObjective:
    """How the auto search's objective is drawn (x) and shown in the table."""

    title: str
    unit: str  # a cell's format (charts.format_value units, or plain)
    budget_key: str | None  # the budget bound that limits this axis
    best: str  # what the delivered candidate is, in words


@dataclass(frozen=True)
class AutoFidelity:
    """How a fidelity figure of the auto search is drawn (y) and shown: the value drawn is the
    stored one × `factor` (accuracy drop is stored negated, higher is better, and drawn as the
    drop in points, lower is better); a budget bound is drawn at bound × `budget_factor`."""

    title: str
    factor: float
    unit: str  # points | dB | percent | plain
    budget_key: str | None
    budget_factor: float = 1.0
    lower_is_better: bool = False


AUTO_OBJECTIVES = {
    "size": AutoObjective("delivered size (bytes)", "bytes", "max_size_bytes", "the smallest"),
    "latency": AutoObjective("latency p50 (ms)", "ms", "max_latency_ms", "the fastest"),
    "balanced": AutoObjective(
        "size ratio × latency ratio (original = 1)", "plain", None, "the best size × latency"
    ),
}
AUTO_FIDELITY = {
    "accuracy_drop": AutoFidelity(
        "accuracy drop (points)", -100.0, "points", "max_accuracy_drop", 100.0, True
    ),
    "cosine_similarity": AutoFidelity(
        "cosine similarity to the original", 1.0, "plain", "min_cosine"
    ),
    "sqnr_db_min": AutoFidelity("worst-slice SQNR (dB)", 1.0, "dB", "min_sqnr_db"),
    "agreement_top1": AutoFidelity("top-1 agreement with the original (%)", 100.0, "percent", None),
}


@dataclass(frozen=True)
class CandidateRow:
    index: str
    name: str
    status: str
    objective: str
    fidelity: str
    outcome: str  # meets the budget, what it missed, why it was skipped, or its error
    seconds: str
    meets: bool | None  # None: not measured
    chosen: bool
    front: bool


@dataclass(frozen=True)
class AutoSearch:
    """One auto step: what it searched for, what it delivered, its chart and its table."""

    step: int
    objective: str
    budget: str
    delivered: str  # what was delivered, in words
    original_delivered: bool
    chart: charts.ParetoChart | None
    absent: str  # why there is no chart, when there is none
    omitted: list[str]
    off_axes: list[str]  # budget bounds the chart's axes cannot show
    rows: list[CandidateRow]
    summary: list[tuple[str, str]]


def _fidelity_text(value: float | None, axis: AutoFidelity) -> str:
    if value is None:
        return "—"
    shown = value * axis.factor + 0.0  # + 0.0: no "-0.00" for a drop of nothing
    if axis.unit == "points":
        return f"drop {shown:.2f} points"
    if axis.unit == "dB":
        return f"{shown:.1f} dB"
    if axis.unit == "percent":
        return f"{shown:.1f} %"
    return f"{shown:.4g}"


def _candidate_row(
    c: dict[str, Any], goal: AutoObjective, chosen: Any, front: set[Any]
) -> CandidateRow:
    status = str(c.get("status", "?"))
    axis = AUTO_FIDELITY.get(str(c.get("fidelity_metric")))
    fid = finite(c.get("fidelity"))
    if status == "measured":
        missed = [str(m) for m in _list(c.get("missed"))]
        outcome = "meets the budget" if c.get("meets") else "missed: " + "; ".join(missed)
    elif status == "skipped":
        outcome = str(c.get("reason") or "skipped (no reason recorded)")
    else:
        outcome = str(c.get("error") or f"{status} (no error recorded)")
    if fid is None or axis is None:
        fidelity_text = "—" if c.get("fidelity") is None else text_of(c.get("fidelity"))
        if axis is None and fid is not None:
            fidelity_text = f"{c.get('fidelity_metric')} {fid:.4g}"
    else:
        fidelity_text = _fidelity_text(fid, axis)
    seconds = finite(c.get("seconds"))
    return CandidateRow(
        str(c.get("index", "?")),
        str(c.get("name", "?")),
        status + (" (reused)" if c.get("reused") else ""),
        cell(c.get("objective"), goal.unit),
        fidelity_text,
        outcome,
        "—" if seconds is None else f"{seconds:.1f} s",
        bool(c.get("meets")) if status == "measured" else None,
        c.get("index") is not None and c.get("index") == chosen,
        c.get("index") in front,
    )


def _or_inf(value: float | None) -> float:
    return math.inf if value is None else value


def _delivered_text(
    details: dict[str, Any], goal: AutoObjective, candidates: list[dict[str, Any]]
) -> tuple[str, bool]:
    chosen = _dict(details.get("chosen"))
    if chosen.get("candidate") is not None:
        return (
            f"Delivered: candidate {chosen['candidate']} ({chosen.get('name', '?')}), "
            f"{goal.best} measured candidate that meets the whole budget.",
            False,
        )
    measured = [c for c in candidates if c.get("status") == "measured"]
    if not chosen:
        return "The step records no delivered model (it did not finish).", False
    if not measured:
        return (
            "The original model was delivered unchanged: no candidate could be measured within "
            "the search limits (raise search.max_minutes or search.max_candidates).",
            True,
        )
    # the engine's own pick for its warning (engine.ops.auto): the smallest summed miss
    closest = min(measured, key=lambda c: _or_inf(finite(c.get("shortfall"))))
    missed = "; ".join(str(m) for m in _list(closest.get("missed")))
    return (
        "The original model was delivered unchanged: no measured candidate met the whole "
        f"budget. The closest was candidate {closest.get('index', '?')} "
        f"({closest.get('name', '?')}), which missed {missed or 'it'}; its recipe is in the "
        "step's details, to relax the budget or take it anyway.",
        True,
    )


def _summary_rows(search: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [
        (label, cell(search.get(key), "count"))
        for label, key in (
            ("catalog", "catalog"),
            ("measured", "measured"),
            ("reused from an earlier attempt", "reused"),
            ("skipped", "skipped"),
            ("failed", "failed"),
        )
        if key in search
    ]
    if search.get("stopped"):
        rows.append(("stopped", str(search["stopped"])))
    seconds = finite(search.get("seconds"))
    if seconds is not None:
        rows.append(("building and measuring", f"{seconds:.1f} s"))
    return rows


def auto_searches(job: dict[str, Any]) -> list[AutoSearch]:
    """Per auto step: every candidate the search measured, objective (x) against fidelity (y),
    the Pareto front as a step line, the delivered one marked, budget bounds as lines; a table
    of every candidate (measured, skipped with its reason, failed with its error) and the
    search's own counts."""
    out = []
    for step in _list(job.get("steps")):
        if not isinstance(step, dict) or step.get("op") != "auto":
            continue
        details = _dict(step.get("details"))
        objective = str(details.get("objective") or _dict(step.get("config")).get("objective"))
        goal = AUTO_OBJECTIVES.get(objective, AutoObjective(objective, "plain", None, "the best"))
        budget = {
            str(k): v
            for k, v in (
                _dict(details.get("budget")) or _dict(_dict(step.get("config")).get("budget"))
            ).items()
            if finite(v) is not None
        }
        candidates = [c for c in _list(details.get("candidates")) if isinstance(c, dict)]
        chosen = _dict(details.get("chosen")).get("candidate")
        front = {p.get("candidate") for p in _list(details.get("pareto")) if isinstance(p, dict)}
        rows = [_candidate_row(c, goal, chosen, front) for c in candidates]
        measured = [c for c in candidates if c.get("status") == "measured"]
        # one y axis: the figure the search drew its front on (engine.search.auto.fidelity
        # picks the same one for every candidate of a search; the most common one otherwise)
        named = Counter(str(c.get("fidelity_metric")) for c in measured)
        metric = named.most_common(1)[0][0] if named else ""
        axis = AUTO_FIDELITY.get(metric, AutoFidelity(metric, 1.0, "plain", None))
        points, omitted = [], []
        for c in measured:
            x, y = finite(c.get("objective")), finite(c.get("fidelity"))
            name = str(c.get("name", "?"))
            if x is None:
                omitted.append(f"{name} (no objective measured)")
            elif str(c.get("fidelity_metric")) != metric:
                omitted.append(f"{name} (fidelity measured as {c.get('fidelity_metric')})")
            elif y is None:
                omitted.append(f"{name} ({metric} not finite: {text_of(c.get('fidelity'))})")
            else:
                points.append(
                    Point(
                        f"{c.get('index', '?')}: {name}",
                        x,
                        y * axis.factor + 0.0,
                        c.get("index") == chosen,
                        bool(c.get("meets")),
                        c.get("index") in front,
                    )
                )
        x_bounds = [
            Bound(f"{k} {v:g}", float(v)) for k, v in budget.items() if k == goal.budget_key
        ]
        y_bounds = [
            Bound(f"{k} {v:g}", float(v) * axis.budget_factor)
            for k, v in budget.items()
            if k == axis.budget_key
        ]
        drawn = {goal.budget_key, axis.budget_key}
        off_axes = [f"{k} {v:g}" for k, v in budget.items() if k not in drawn]
        chart = None
        if points:
            chart = charts.pareto_chart(
                points,
                goal.title,
                axis.title or "fidelity",
                x_bounds=x_bounds,
                y_bounds=y_bounds,
                lower_y_better=axis.lower_is_better,
            )
        counts = Counter(str(c.get("status")) for c in candidates)
        if not candidates:
            absent = "The auto step recorded no candidates (it did not finish its search)."
        elif not measured:
            absent = (
                f"No candidate was measured ({counts['skipped']} skipped, {counts['failed']} "
                "failed: see the table), so there is nothing to plot."
            )
        else:
            absent = (
                f"{len(measured)} candidate(s) measured, none with a finite objective and "
                "fidelity figure to plot."
            )
        delivered, original = _delivered_text(details, goal, candidates)
        out.append(
            AutoSearch(
                int(step.get("index", 0)),
                objective,
                ", ".join(f"{k} {v:g}" for k, v in budget.items()) or "—",
                delivered,
                original,
                chart,
                absent,
                omitted if chart else [],
                off_axes,
                rows,
                _summary_rows(_dict(details.get("search"))),
            )
        )
    return out


def _histories(details: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Per-epoch rows a training step recorded: `epochs` (fine_tune, distill, QAT), a prune's
    `fine_tune` and the training of each of its `rounds`."""
    found: list[tuple[str, list[dict[str, Any]]]] = []

    def add(name: str, rows: Any) -> None:
        rows = [
            r for r in _list(rows) if isinstance(r, dict) and finite(r.get("epoch")) is not None
        ]
        if rows:
            found.append((name, rows))

    add("training", details.get("epochs"))
    add("fine-tune", details.get("fine_tune"))
    add("QAT", _dict(details.get("qat")).get("epochs"))
    for r in _list(details.get("rounds")):
        if isinstance(r, dict):
            add(f"round {r.get('round', '?')}", r.get("training"))
    return found


def training_charts(job: dict[str, Any]) -> list[StepChart]:
    """Per training run: the loss per epoch, and the quality figures per epoch (training-set
    accuracy/agreement, the held-out figure that picks the best epoch; epoch 0 is the input)."""
    out = []
    for step in _list(job.get("steps")):
        details = _dict(step.get("details"))
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
    steps = [s for s in _list(job.get("steps")) if isinstance(s, dict)]
    labelled = set(
        step_warnings(
            (s.get("index", "?"), s.get("op", "?"), _list(s.get("warnings"))) for s in steps
        )
    )
    out = [("job", str(w)) for w in _list(job.get("warnings")) if str(w) not in labelled]
    for step in steps:
        where = f"step {step.get('index', '?')} ({step.get('op', '?')})"
        out += [(where, str(w)) for w in _list(step.get("warnings"))]
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
    for a in _list(job.get("artifacts")):
        if not isinstance(a, dict):
            continue
        verdict = a.get("verdict") or _dict(a.get("quality")).get("verdict")
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
    metrics = _dict(job.get("metrics"))
    blocks = [("original", metrics.get("original")), ("result", metrics.get("final"))]
    evaluation = [
        (str(k), cell(v, "plain"))
        for k, v in {**_dict(job.get("evaluation")), **_dict(metrics.get("evaluation"))}.items()
    ]
    return Report(
        job=job,
        status=str(job.get("status", "?")),
        verdict=quality_of(job, metrics),
        error=_dict(job.get("error")) or None,
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
