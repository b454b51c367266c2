"""Activation ranges chosen per tensor by their expected quantization error.

Min/max calibration lets one rare large activation stretch a tensor's 256 levels over values
that almost never occur; a percentile clips every tensor alike, including the ones whose
extremes are what the model computes (a detector's box coordinates). Here each tensor gets the
range — its min/max or one of a few two-sided percentiles — with the least expected squared
error on the calibration histogram: rounding noise step²/12 for the values inside the range,
plus the squared distance to the bound for each value clipped (the MSE calibration of
NVIDIA's pytorch-quantization toolkit and TensorRT, here over onnxruntime's histograms).

The search builds the most promising variant again with these ranges and keeps it only when it
measures better on the held-out selection samples (engine.ops.quantize.search).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

LEVELS = 256  # 8-bit activations, asymmetric (onnxruntime's default for int8 and uint8)
PERCENTILES = (99.9, 99.99, 99.999)  # two-sided: half of the rest cut on each side


def candidates(hist: np.ndarray, edges: np.ndarray, lo: float, hi: float) -> dict[str, tuple]:
    """The ranges considered for one tensor: min/max, and each two-sided percentile of the
    histogram (clamped to min/max)."""
    out: dict[str, tuple[float, float]] = {"minmax": (lo, hi)}
    total = float(hist.sum())
    if total <= 0:
        return out
    cdf = np.cumsum(hist) / total
    for p in PERCENTILES:
        cut = (100.0 - p) / 200.0
        left = float(edges[int(np.searchsorted(cdf, cut))])
        right = float(edges[min(len(edges) - 1, int(np.searchsorted(cdf, 1.0 - cut)) + 1)])
        out[f"p{p}"] = (max(lo, left), min(hi, right))
    return out


def expected_error(hist: np.ndarray, edges: np.ndarray, lo: float, hi: float) -> float:
    """Expected squared error of quantizing the histogram's values to LEVELS asymmetric levels
    over [lo, hi] (widened to hold 0, as onnxruntime does)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo <= 0:
        return float(np.sum(hist * ((edges[:-1] + edges[1:]) / 2) ** 2))
    step = (hi - lo) / (LEVELS - 1)
    centers = (edges[:-1] + edges[1:]) / 2
    clipped = np.clip(centers, lo, hi)
    inside = centers == clipped
    rounding = float(hist[inside].sum()) * step * step / 12.0
    clipping = float(np.sum(hist[~inside] * (centers[~inside] - clipped[~inside]) ** 2))
    return rounding + clipping


def choose(histograms: dict[str, tuple]) -> tuple[dict[str, tuple[float, float]], dict[str, Any]]:
    """Per tensor, the candidate range with the least expected error, from onnxruntime's
    HistogramCollector entries (hist, edges, min, max, ...). Returns the ranges and a report:
    how many tensors took each kind of range, and the tensors clipped the most (their min/max
    over the range kept)."""
    ranges: dict[str, tuple[float, float]] = {}
    chosen: Counter[str] = Counter()
    clipped: list[tuple[float, str, str]] = []
    for name, entry in histograms.items():
        hist = np.asarray(entry[0], dtype=np.float64)
        edges = np.asarray(entry[1], dtype=np.float64)
        lo, hi = float(entry[2]), float(entry[3])
        options = candidates(hist, edges, lo, hi)
        errors = {k: expected_error(hist, edges, a, b) for k, (a, b) in options.items()}
        best = min(errors, key=lambda k: (errors[k], k != "minmax"))
        ranges[name] = options[best]
        chosen[best] += 1
        if best != "minmax":
            width = max(hi, 0.0) - min(lo, 0.0)
            kept = max(options[best][1], 0.0) - min(options[best][0], 0.0)
            clipped.append((width / max(kept, 1e-30), name, best))
    clipped.sort(reverse=True)
    report = {
        "tensors": len(ranges),
        "chosen": dict(sorted(chosen.items())),
        "most_clipped": [
            {"tensor": name, "range": kind, "minmax_over_kept": round(ratio, 2)}
            for ratio, name, kind in clipped[:8]
        ],
    }
    return ranges, report
