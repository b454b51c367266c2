"""The job report's chart geometry (app/report/charts.py), without a template or a browser."""

from __future__ import annotations

import math

import pytest

from app.report import charts
from app.report.charts import Comparison, Point, Series


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
