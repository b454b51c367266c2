"""Jobs side by side: each finished job a point, its deliverable's size or latency against its
fidelity to the original, drawn with the report's chart geometry (app/report/charts.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from app.report import charts

XAxis = Literal["size", "latency"]
X_AXES: dict[str, tuple[str, str, float]] = {
    # name: (metric of metrics.final, axis title, divisor)
    "size": ("size_bytes", "size of the result (KiB)", 1024.0),
    "latency": ("latency_ms_p50", "latency p50 of the result (ms)", 1.0),
}
# the first fidelity figure a job has, in this order
FIDELITY = [
    ("agreement_top1", "top-1 agreement with the original"),
    ("cosine_similarity", "cosine similarity to the original"),
]


@dataclass(frozen=True)
class Row:
    job_id: str
    label: str
    status: str
    x: float | None
    y: float | None
    compression_ratio: float | None
    speedup: float | None
    accuracy_drop: float | None


@dataclass(frozen=True)
class Comparison:
    x_axis: str
    x_title: str
    y_title: str
    rows: list[Row]
    chart: charts.ScatterChart | None

    @property
    def plotted(self) -> list[Row]:
        return [r for r in self.rows if r.x is not None and r.y is not None]


def _label(job: dict[str, Any]) -> str:
    what = job.get("preset") or "+".join(str(s.get("op")) for s in job.get("steps") or []) or "?"
    return f"{str(job.get('id', '?'))[-6:]} {what}"


def fidelity_key(jobs: list[dict[str, Any]]) -> tuple[str, str]:
    """The fidelity metric most of these jobs have (agreement, else cosine)."""
    for key, title in FIDELITY:
        if any(charts.finite((j.get("metrics") or {}).get("final", {}).get(key)) for j in jobs):
            return key, title
    return FIDELITY[0]


def compare(jobs: list[dict[str, Any]], x_axis: XAxis = "size") -> Comparison:
    """The comparison of `jobs` (JobRead as JSON); jobs without both figures are listed, not
    plotted."""
    metric, x_title, divisor = X_AXES[x_axis]
    y_key, y_title = fidelity_key(jobs)
    rows = []
    for job in jobs:
        metrics = job.get("metrics") or {}
        final = metrics.get("final") or {}
        ratios = metrics.get("ratios") or {}
        x = charts.finite(final.get(metric))
        rows.append(
            Row(
                job_id=str(job["id"]),
                label=_label(job),
                status=str(job.get("status")),
                x=x / divisor if x is not None else None,
                y=charts.finite(final.get(y_key)),
                compression_ratio=charts.finite(ratios.get("compression_ratio")),
                speedup=charts.finite(ratios.get("speedup")),
                accuracy_drop=charts.finite(ratios.get("accuracy_drop")),
            )
        )
    points = [charts.Point(r.label, r.x, r.y) for r in rows if r.x is not None and r.y is not None]
    chart = charts.scatter_chart(points, x_title, y_title) if points else None
    return Comparison(x_axis, x_title, y_title, rows, chart)
