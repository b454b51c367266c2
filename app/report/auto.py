"""The report's auto search section (one per `auto` step): the candidates' scatter of
objective against fidelity with the Pareto front, the budget's bounds and the delivered point,
the table of every candidate, and the search summary."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from app.report import charts
from app.report.charts import Bound, Point, finite
from app.report.values import as_dict, as_list, cell, text_of


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
        missed = [str(m) for m in as_list(c.get("missed"))]
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
    chosen = as_dict(details.get("chosen"))
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
    missed = "; ".join(str(m) for m in as_list(closest.get("missed")))
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
            ("sweeps made past the catalog", "sweeps"),
            ("measured", "measured"),
            ("probed before training", "probed"),
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
        rows.append(("building, probing and measuring", f"{seconds:.1f} s"))
    return rows


def auto_searches(job: dict[str, Any]) -> list[AutoSearch]:
    """Per auto step: every candidate the search measured, objective (x) against fidelity (y),
    the Pareto front as a step line, the delivered one marked, budget bounds as lines; a table
    of every candidate (measured, skipped with its reason, failed with its error) and the
    search's own counts."""
    out = []
    for step in as_list(job.get("steps")):
        if not isinstance(step, dict) or step.get("op") != "auto":
            continue
        details = as_dict(step.get("details"))
        objective = str(details.get("objective") or as_dict(step.get("config")).get("objective"))
        goal = AUTO_OBJECTIVES.get(objective, AutoObjective(objective, "plain", None, "the best"))
        budget = {
            str(k): v
            for k, v in (
                as_dict(details.get("budget")) or as_dict(as_dict(step.get("config")).get("budget"))
            ).items()
            if finite(v) is not None
        }
        candidates = [c for c in as_list(details.get("candidates")) if isinstance(c, dict)]
        chosen = as_dict(details.get("chosen")).get("candidate")
        front = {p.get("candidate") for p in as_list(details.get("pareto")) if isinstance(p, dict)}
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
                _summary_rows(as_dict(details.get("search"))),
            )
        )
    return out
