"""The job report's chart geometry (app/report/charts.py), without a template or a browser;
the auto search's chart from the details of real searches (tests/app/conftest.py)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from app.report import charts, view
from app.report.charts import Bound, Comparison, Point, Series


def test_finite_keeps_only_measured_numbers() -> None:
    assert charts.finite(3) == 3.0 and charts.finite(0.5) == 0.5
    for value in (None, True, "1.0", math.nan, math.inf, [1]):
        assert charts.finite(value) is None


@pytest.mark.parametrize(
    ("lo", "hi"),
    [
        (0.0, 1.0),
        (0.0534, 0.0551),
        (12.0, 13.0),
        (-3.0, 40.0),
        (5.0, 5.0),
        (0.0, 53.0),
        (0.0, 911311.0),
    ],
)
def test_nice_ticks_cover_the_range_with_distinct_labels(lo: float, hi: float) -> None:
    ticks = charts.nice_ticks(lo, hi, 5)
    assert ticks[0] <= lo and ticks[-1] >= hi
    steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:], strict=False)}
    assert len(steps) == 1 and 3 <= len(ticks) <= 12
    labels = [charts.tick_label(t, ticks[1] - ticks[0]) for t in ticks]
    assert len(set(labels)) == len(labels), labels
    for tick, label in zip(ticks, labels, strict=True):
        assert float(label.replace("\u2009", "")) == pytest.approx(tick, rel=1e-3, abs=1e-9)


def test_scale_maps_domain_onto_range_both_ways() -> None:
    y = charts.Scale(0.0, 10.0, 200.0, 20.0)  # SVG y grows downwards
    assert (y(0.0), y(10.0), y(5.0)) == (200.0, 20.0, 110.0)
    assert charts.Scale(1.0, 1.0, 0.0, 100.0)(1.0) == 50.0  # a flat domain sits in the middle


def test_comparison_bars_scale_to_the_larger_value() -> None:
    chart = charts.comparison_chart(Comparison("File size", 911311.0, 232477.0, "bytes"))
    before, after = chart.bars
    assert (before.kind, after.kind) == ("before", "after")
    assert after.width / before.width == pytest.approx(232477 / 911311, rel=0.01)
    assert before.text == "889.95 KiB" and chart.change == "3.92× smaller"
    assert after.y > before.y + before.height  # stacked, not overlapping


def test_comparison_says_what_was_not_measured() -> None:
    chart = charts.comparison_chart(Comparison("MACs", None, 2.5e6, "count"))
    assert chart.bars[0].width == 0 and chart.bars[0].text == "not measured"
    assert chart.bars[1].text == "2.50 M" and chart.change == ""
    latency = charts.comparison_chart(Comparison("p50", 0.2, 0.1, "ms"))
    assert latency.change == "2.00× faster"
    acc = charts.comparison_chart(Comparison("acc", 0.985, 0.975, "fraction", "higher"))
    assert acc.change == "-1.0 points" and acc.bars[1].text == "97.5 %"


def test_hbar_chart_orders_and_scales_layers() -> None:
    items = [("conv1", 20.0, "measured"), ("fc", 40.0, "measured"), ("conv2", 35.0, "estimated")]
    chart = charts.hbar_chart(items, "dB")
    assert [b.label for b in chart.bars] == ["conv1", "fc", "conv2"]
    assert chart.bars[1].width == pytest.approx(2 * chart.bars[0].width, rel=0.01)
    assert [b.y for b in chart.bars] == sorted(b.y for b in chart.bars)
    assert chart.axis_y > chart.bars[-1].y + chart.bars[-1].height - 1
    assert chart.ticks[0].label == "0" and chart.ticks[-1].pos <= chart.width


def test_scatter_places_points_inside_the_plot_and_marks_the_chosen() -> None:
    points = [Point("a", 0.05, 42.5), Point("b", 0.054, 27.2), Point("c", 0.0536, 42.4, True)]
    chart = charts.scatter_chart(points, "latency", "SQNR")
    plot = chart.plot
    for p in chart.points:
        assert plot.left <= p.cx <= plot.right and plot.top <= p.cy <= plot.bottom
    a, b, c = chart.points
    assert a.cx < c.cx < b.cx  # faster left
    assert b.cy > a.cy  # less faithful lower (larger SVG y)
    assert [p.chosen for p in chart.points] == [False, False, True]


def test_line_chart_polylines_follow_the_epochs() -> None:
    loss = Series("loss", [(1.0, 0.8), (2.0, 0.5), (3.0, 0.4)])
    chart = charts.line_chart([loss, Series("empty", [])], "epoch", "loss")
    assert [s.name for s in chart.series] == ["loss"]
    (placed,) = chart.series
    xs = [x for x, _ in placed.markers]
    ys = [y for _, y in placed.markers]
    assert xs == sorted(xs) and ys == sorted(ys)  # loss falls: y (downwards) grows
    assert placed.polyline == " ".join(f"{x},{y}" for x, y in placed.markers)


def test_log_ticks_are_round_and_cover_the_data_without_padding_a_decade() -> None:
    assert charts.log_ticks(9207.0, 458620.0) == [5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5]
    assert charts.log_ticks(0.02, 0.3) == [0.02, 0.05, 0.1, 0.2, 0.5]
    wide = charts.log_ticks(3.0, 4e9)  # ten decades: powers of ten only, every other one
    assert wide[0] <= 3.0 and wide[-1] >= 4e9 and len(wide) <= 8
    assert all(math.log10(t) == round(math.log10(t)) for t in wide)
    assert charts.spans_decades([9207.0, 458620.0]) and not charts.spans_decades([8e4, 4.6e5])
    assert not charts.spans_decades([0.0, 100.0])  # zero has no place on a log axis
    log = charts.Scale(1.0, 100.0, 0.0, 100.0, log=True)
    assert (log(1.0), log(10.0), log(100.0)) == (0.0, 50.0, 100.0)


def test_pareto_front_is_a_staircase_and_bounds_span_the_plot() -> None:
    points = [
        Point("a", 100.0, 0.90, front=True),
        Point("b", 300.0, 0.99, chosen=True, front=True),
        Point("c", 400.0, 0.95, meets=False),  # dominated by b
    ]
    chart = charts.pareto_chart(
        points, "size", "cosine", x_bounds=[Bound("max", 350.0)], y_bounds=[Bound("min", 0.97)]
    )
    a, b, c = chart.points
    # from a right to b's x at a's height, then up to b
    assert chart.front == f"{a.cx},{a.cy} {b.cx},{a.cy} {b.cx},{b.cy}"
    assert b.cy < a.cy  # more faithful is up
    (x_line,) = chart.x_bounds
    (y_line,) = chart.y_bounds
    assert b.cx < x_line.x1 < c.cx and (x_line.y1, x_line.y2) == (chart.plot.top, chart.plot.bottom)
    assert b.cy < y_line.y1 < c.cy < a.cy and (y_line.x1, y_line.x2) == (
        chart.plot.left,
        chart.plot.right,
    )
    # a figure where lower is better runs downwards: better is still up
    drop = charts.pareto_chart([Point("x", 1.0, 0.0), Point("y", 2.0, 1.5)], "s", "drop",
                               lower_y_better=True)  # fmt: skip
    assert drop.points[0].cy < drop.points[1].cy


def _section(job: dict[str, Any]) -> tuple[view.AutoSearch, dict[str, Any]]:
    (section,) = view.auto_searches(job)
    return section, job["steps"][0]["details"]


def _expected(value: float, scale: charts.Scale) -> float:
    """Where `value` belongs on `scale`, computed here from its domain and range."""
    lo, hi, v = scale.lo, scale.hi, value
    if scale.log:
        lo, hi, v = math.log10(lo), math.log10(hi), math.log10(v)
    return scale.start + (v - lo) / (hi - lo) * (scale.end - scale.start)


def test_auto_chart_of_a_real_search_met(auto_jobs: dict[str, dict[str, Any]]) -> None:
    section, details = _section(auto_jobs["met"])
    chart = section.chart
    assert chart is not None
    measured = [c for c in details["candidates"] if c["status"] == "measured"]
    assert len(chart.points) == len(measured) >= 2  # one point per measured candidate
    chosen = [p for p in chart.points if p.chosen]
    assert len(chosen) == 1 and chosen[0].label.endswith(details["chosen"]["name"])
    assert {p.label.split(":")[0] for p in chart.points if p.front} == {
        str(p["candidate"]) for p in details["pareto"]
    }
    by_label = {f"{c['index']}: {c['name']}": c for c in measured}
    for p in chart.points:
        c = by_label[p.label]
        assert p.x == c["objective"] and p.meets is c["meets"]
        assert p.y == pytest.approx(-100 * c["fidelity"])  # drop in points, stored negated
    # objective size with only a fidelity bound: one horizontal line at 1 point of drop
    assert chart.x_bounds == []
    (line,) = chart.y_bounds
    assert line.value == pytest.approx(100 * details["budget"]["max_accuracy_drop"])
    assert line.y1 == line.y2 == pytest.approx(_expected(line.value, chart.y_scale), abs=0.01)
    assert chart.y_scale.start < chart.y_scale.end  # drop runs downwards: lower drop is up
    for p in chart.points:  # meeting the budget's drop means being on or above the line
        c = by_label[p.label]
        assert (p.cy <= line.y1) is (-c["fidelity"] <= details["budget"]["max_accuracy_drop"])
    assert not chart.x_scale.log  # 8e4 … 4.6e5 B: less than a decade


def test_auto_chart_of_a_real_search_impossible(auto_jobs: dict[str, dict[str, Any]]) -> None:
    section, details = _section(auto_jobs["impossible"])
    chart = section.chart
    assert chart is not None and section.original_delivered
    measured = [c for c in details["candidates"] if c["status"] == "measured"]
    assert len(chart.points) == len(measured) >= 1
    assert not any(p.chosen or p.meets for p in chart.points)  # the original was delivered
    # max_size_bytes is 1 % of the original: the x axis takes it in and turns logarithmic
    (x_line,) = chart.x_bounds
    assert x_line.value == details["budget"]["max_size_bytes"] and chart.x_scale.log
    assert x_line.x1 == x_line.x2 == pytest.approx(_expected(x_line.value, chart.x_scale), abs=0.01)
    assert all(x_line.x1 < p.cx for p in chart.points)
    (y_line,) = chart.y_bounds  # max_accuracy_drop 0: the line at no drop
    assert y_line.value == 0.0
    assert y_line.y1 == pytest.approx(_expected(0.0, chart.y_scale), abs=0.01)
    for p in chart.points:
        assert (p.y == 0.0) is (p.cy == y_line.y1)
