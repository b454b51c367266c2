"""Pure data-to-chart geometry for the job report: scales, ticks, bars, scatter points and
polylines, in SVG user units. No template, web framework or job knowledge here: the template
draws what these return, and the tests check the numbers without a browser."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

WIDTH = 640.0  # every chart's SVG viewBox width
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 56.0, 16.0, 12.0, 40.0


def finite(value: object) -> float | None:
    """`value` as a float when it is a finite real number (not a bool), else None: the report
    plots only what was measured."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values (1, 2, 2.5 or 5 × 10^k apart) covering [lo, hi]."""
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    ticks: list[float] = []
    value = first
    while value < hi + step * 0.5 and len(ticks) < 50:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def tick_label(value: float, step: float | None = None) -> str:
    """A tick's text: short, no trailing zeros (1 200, 0.25, 1.5e-05), with as many decimals
    as the tick `step` needs so that neighbouring ticks never read the same."""
    if value == 0:
        return "0"
    if abs(value) >= 1e6 or abs(value) < 1e-4:
        return f"{value:.3g}"
    if abs(value) >= 100 and (step is None or step >= 1):
        return f"{value:,.0f}".replace(",", "\u2009")
    decimals = 3 if step is None else max(0, 1 - math.floor(math.log10(step)))
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def spans_decades(values: Sequence[float]) -> bool:
    """Whether `values` want a log axis: all positive, the largest at least ten times the
    smallest (on a linear axis the small ones would sit in one corner)."""
    return bool(values) and min(values) > 0 and max(values) >= 10 * min(values)


def log_ticks(lo: float, hi: float) -> list[float]:
    """Round ticks for a log axis covering [lo, hi] (both > 0): 1, 2 and 5 × 10^k over up to
    three decades, powers of ten beyond (every n-th one past seven decades); the first tick is
    the last at or below `lo` and the last the first at or above `hi`, so no decade is padded
    out when the data fill only part of it."""
    if hi < lo:
        lo, hi = hi, lo
    k0, k1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if k1 - k0 <= 3:
        ticks = sorted(float(f"{m}e{k}") for k in range(k0, k1 + 1) for m in (1, 2, 5))
    else:
        every = max(1, math.ceil((k1 - k0) / 7))
        ticks = [float(f"1e{k}") for k in range(k0, k1 + every, every)]
    first = max(t for t in ticks if t <= lo * (1 + 1e-9))
    last = min(t for t in ticks if t >= hi * (1 - 1e-9))
    return [t for t in ticks if first <= t <= last]


@dataclass(frozen=True)
class Scale:
    """Map of the domain [lo, hi] onto the range [start, end] (end < start for y), linear or
    logarithmic (`log`: equal ratios are equal distances; the domain is then positive)."""

    lo: float
    hi: float
    start: float
    end: float
    log: bool = False

    def __call__(self, value: float) -> float:
        lo, hi = self.lo, self.hi
        if self.log:
            lo, hi, value = math.log10(lo), math.log10(hi), math.log10(value)
        span = hi - lo
        fraction = (value - lo) / span if span else 0.5
        return round(self.start + fraction * (self.end - self.start), 2)


@dataclass(frozen=True)
class Tick:
    pos: float
    label: str


def axis_ticks(scale: Scale, values: Sequence[float]) -> list[Tick]:
    step = values[1] - values[0] if len(values) > 1 else None
    return [Tick(scale(v), tick_label(v, step)) for v in values if scale.lo <= v <= scale.hi]


# ----------------------------------------------------------------------------- before / after


@dataclass(frozen=True)
class Bar:
    label: str
    text: str
    x: float
    y: float
    width: float
    height: float
    kind: str  # css class suffix: before | after


@dataclass(frozen=True)
class Comparison:
    """One metric measured on the original and on the result."""

    title: str
    before: float | None
    after: float | None
    unit: str = ""
    better: str = "lower"  # lower | higher: which way the result should move


@dataclass(frozen=True)
class ComparisonChart:
    title: str
    width: float
    height: float
    bars: list[Bar]
    change: str  # e.g. "3.8× smaller", "−0.5 points"; "" when it cannot be said


def format_value(value: float, unit: str) -> str:
    """A measured value with its unit, readable: bytes in KiB/MiB, big counts in k/M/G."""
    if unit == "bytes":
        for size, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if abs(value) >= size:
                return f"{value / size:.2f} {name}"
        return f"{value:.0f} B"
    if unit == "count":
        for big, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(value) >= big:
                return f"{value / big:.2f} {prefix}"
        return f"{value:.0f}"
    if unit == "ms":
        return f"{value:.3g} ms"
    if unit == "fraction":
        return f"{value * 100:.1f} %"
    if unit == "dB":
        return f"{value:.1f} dB"
    return f"{value:.4g}"


def _change(c: Comparison) -> str:
    before, after = c.before, c.after
    if before is None or after is None:
        return ""
    if c.unit == "fraction":
        points = (after - before) * 100
        return f"{points:+.1f} points"
    if before > 0 and after > 0:
        factor = before / after
        if c.unit == "ms":
            return f"{factor:.2f}× faster" if factor >= 1 else f"{1 / factor:.2f}× slower"
        if factor >= 1:
            return f"{factor:.2f}× smaller"
        return f"{1 / factor:.2f}× larger"
    return ""


def comparison_chart(c: Comparison, width: float = 300.0) -> ComparisonChart:
    """Two horizontal bars, original and result, scaled to the larger of the two; a missing
    value gets no bar (its text says so)."""
    label_w, bar_h, gap, top = 64.0, 18.0, 8.0, 4.0
    usable = width - label_w - 80.0  # room for the value text right of the bar
    values = [v for v in (c.before, c.after) if v is not None]
    top_value = max((abs(v) for v in values), default=0.0) or 1.0
    bars = []
    for i, (label, value, kind) in enumerate(
        (("original", c.before, "before"), ("result", c.after, "after"))
    ):
        y = top + i * (bar_h + gap)
        length = 0.0 if value is None else round(max(abs(value) / top_value * usable, 1.0), 2)
        text = "not measured" if value is None else format_value(value, c.unit)
        bars.append(Bar(label, text, label_w, y, length, bar_h, kind))
    height = top + 2 * bar_h + gap + 6.0
    return ComparisonChart(c.title, width, height, bars, _change(c))


# ----------------------------------------------------------------------------- horizontal bars


@dataclass(frozen=True)
class HBarChart:
    width: float
    height: float
    label_width: float
    bars: list[Bar]
    ticks: list[Tick]
    axis_y: float
    x_title: str


def hbar_chart(
    items: Sequence[tuple[str, float, str]], x_title: str, lo: float | None = None
) -> HBarChart:
    """One horizontal bar per (label, value, kind), top to bottom in the order given, on a
    shared axis from `lo` (default: 0, or the smallest value when one is negative)."""
    label_w, bar_h, gap = 180.0, 14.0, 4.0
    values = [v for _, v, _ in items]
    low = lo if lo is not None else min([0.0, *values])
    ticks = nice_ticks(low, max([*values, low + 1e-9]), 5)
    scale = Scale(ticks[0], ticks[-1], label_w, WIDTH - MARGIN_RIGHT - 40.0)
    bars = []
    for i, (label, value, kind) in enumerate(items):
        y = MARGIN_TOP + i * (bar_h + gap)
        x0, x1 = scale(max(ticks[0], min(0.0, value))), scale(value)
        if ticks[0] > 0:
            x0 = scale(ticks[0])
        bars.append(Bar(label, tick_label(value), x0, y, max(round(x1 - x0, 2), 1.0), bar_h, kind))
    axis_y = MARGIN_TOP + len(items) * (bar_h + gap)
    return HBarChart(
        WIDTH, axis_y + MARGIN_BOTTOM, label_w, bars, axis_ticks(scale, ticks), axis_y, x_title
    )


# ----------------------------------------------------------------------------- scatter


@dataclass(frozen=True)
class Point:
    label: str
    x: float
    y: float
    chosen: bool = False
    meets: bool = True  # within the budget (the auto search's chart draws misses hollow)
    front: bool = False  # on the Pareto front


@dataclass(frozen=True)
class PlacedPoint:
    label: str
    x: float
    y: float
    cx: float
    cy: float
    chosen: bool
    meets: bool = True
    front: bool = False


@dataclass(frozen=True)
class Plot:
    """A 2-D plot area with its axes: (left, top)-(right, bottom) in SVG units."""

    width: float
    height: float
    left: float
    top: float
    right: float
    bottom: float
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    x_title: str
    y_title: str


@dataclass(frozen=True)
class ScatterChart:
    plot: Plot
    points: list[PlacedPoint]


def _plot(
    xs: Sequence[float],
    ys: Sequence[float],
    x_title: str,
    y_title: str,
    height: float = 280.0,
    *,
    log_x: bool = False,
    y_down: bool = False,
) -> tuple[Plot, Scale, Scale]:
    """The plot area and its scales; `log_x` for a logarithmic x axis (positive xs), `y_down`
    for a y axis whose larger values are lower (a figure where lower is better, drawn so that
    better is still up)."""
    left, right = MARGIN_LEFT, WIDTH - MARGIN_RIGHT
    top, bottom = MARGIN_TOP, height - MARGIN_BOTTOM
    xt = log_ticks(min(xs), max(xs)) if log_x else nice_ticks(min(xs), max(xs), 6)
    yt = nice_ticks(min(ys), max(ys), 5)
    sx = Scale(xt[0], xt[-1], left, right, log=log_x)
    sy = Scale(yt[0], yt[-1], top, bottom) if y_down else Scale(yt[0], yt[-1], bottom, top)
    plot = Plot(
        WIDTH,
        height,
        left,
        top,
        right,
        bottom,
        axis_ticks(sx, xt),
        axis_ticks(sy, yt),
        x_title,
        y_title,
    )
    return plot, sx, sy


def scatter_chart(points: Sequence[Point], x_title: str, y_title: str) -> ScatterChart:
    """Points on linear axes fitted to them (round ticks); the chosen one is flagged so the
    template can mark it."""
    plot, sx, sy = _plot([p.x for p in points], [p.y for p in points], x_title, y_title)
    placed = [PlacedPoint(p.label, p.x, p.y, sx(p.x), sy(p.y), p.chosen) for p in points]
    return ScatterChart(plot, placed)


# ----------------------------------------------------------------------------- Pareto front


@dataclass(frozen=True)
class Bound:
    """A limit drawn across the plot: x = value (a vertical line) or y = value."""

    label: str
    value: float


@dataclass(frozen=True)
class BoundLine:
    label: str
    value: float
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True)
class ParetoChart:
    plot: Plot
    points: list[PlacedPoint]
    front: str  # the SVG `points` of the front's step line; "" without a front point
    x_bounds: list[BoundLine]
    y_bounds: list[BoundLine]
    x_scale: Scale
    y_scale: Scale


def pareto_chart(
    points: Sequence[Point],
    x_title: str,
    y_title: str,
    *,
    x_bounds: Sequence[Bound] = (),
    y_bounds: Sequence[Bound] = (),
    lower_y_better: bool = False,
) -> ParetoChart:
    """Cost (x, lower is better) against quality (y) of every point, with the front drawn as a
    step line through the points flagged `front` and the bounds as lines across the plot.
    The axes take in the bounds too, so a budget far from every point is still on the chart;
    x is logarithmic where it spans a decade or more; better quality is always up (a y where
    lower is better runs downwards)."""
    xs = [p.x for p in points] + [b.value for b in x_bounds]
    ys = [p.y for p in points] + [b.value for b in y_bounds]
    log_x = spans_decades(xs)
    plot, sx, sy = _plot(
        xs,
        ys,
        f"{x_title}, log scale" if log_x else x_title,
        y_title,
        300.0,
        log_x=log_x,
        y_down=lower_y_better,
    )
    placed = [
        PlacedPoint(p.label, p.x, p.y, sx(p.x), sy(p.y), p.chosen, p.meets, p.front) for p in points
    ]
    # the front as a staircase: from each point right to the next one's x, then up to it
    # (sorted by cost, a front's quality rises; below and right of the stairs is dominated)
    stairs: list[tuple[float, float]] = []
    for p in sorted((p for p in placed if p.front), key=lambda p: (p.x, -p.cy)):
        if stairs:
            stairs.append((p.cx, stairs[-1][1]))
        stairs.append((p.cx, p.cy))
    x_lines = [
        BoundLine(b.label, b.value, sx(b.value), plot.top, sx(b.value), plot.bottom)
        for b in x_bounds
    ]
    y_lines = [
        BoundLine(b.label, b.value, plot.left, sy(b.value), plot.right, sy(b.value))
        for b in y_bounds
    ]
    front = " ".join(f"{x},{y}" for x, y in stairs)
    return ParetoChart(plot, placed, front, x_lines, y_lines, sx, sy)


# ----------------------------------------------------------------------------- lines


@dataclass(frozen=True)
class Series:
    name: str
    points: list[tuple[float, float]]


@dataclass(frozen=True)
class PlacedSeries:
    name: str
    polyline: str  # the SVG `points` attribute
    markers: list[tuple[float, float]]
    index: int  # colour slot


@dataclass(frozen=True)
class LineChart:
    plot: Plot
    series: list[PlacedSeries] = field(default_factory=list)


def line_chart(series: Sequence[Series], x_title: str, y_title: str) -> LineChart:
    """Each series as a polyline over shared axes (x: epoch); series without points are left
    out, so the caller checks for an empty chart first."""
    kept = [s for s in series if s.points]
    xs = [x for s in kept for x, _ in s.points]
    ys = [y for s in kept for _, y in s.points]
    plot, sx, sy = _plot(xs or [0.0], ys or [0.0], x_title, y_title, height=240.0)
    placed = []
    for i, s in enumerate(kept):
        marks = [(sx(x), sy(y)) for x, y in sorted(s.points)]
        placed.append(PlacedSeries(s.name, " ".join(f"{x},{y}" for x, y in marks), marks, i))
    return LineChart(plot, placed)
