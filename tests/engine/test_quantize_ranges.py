"""Activation ranges per tensor by expected error (engine.ops.quantize.ranges)."""

from __future__ import annotations

import numpy as np

from engine.ops.quantize.ranges import choose, expected_error


def _histogram(values: np.ndarray, bins: int = 2048) -> tuple:
    threshold = float(np.abs(values).max())
    hist, edges = np.histogram(values, bins, range=(-threshold, threshold))
    return (hist, edges, float(values.min()), float(values.max()), threshold)


def test_a_long_tail_is_clipped_and_a_bounded_tensor_keeps_its_min_max() -> None:
    rng = np.random.default_rng(0)
    heavy = rng.standard_t(2, size=200_000)  # a long tail: a few values stretch min/max
    bounded = rng.uniform(0.0, 6.0, size=200_000)  # a ReLU6: every level is used
    ranges, report = choose({"heavy": _histogram(heavy), "bounded": _histogram(bounded)})
    lo, hi = ranges["heavy"]
    assert hi - lo < (heavy.max() - heavy.min()) / 2  # the tail no longer sets the step
    assert ranges["bounded"] == (float(bounded.min()), float(bounded.max()))
    assert report["tensors"] == 2 and report["chosen"]["minmax"] == 1
    assert report["most_clipped"][0]["tensor"] == "heavy"
    assert report["most_clipped"][0]["minmax_over_kept"] >= 2


def test_the_expected_error_matches_quantizing_the_values() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(size=100_000)
    hist, edges, *_ = _histogram(values)
    for lo, hi in ((-4.0, 4.0), (-2.0, 2.0), (-1.0, 3.0)):
        step = (hi - lo) / 255
        zero = round(-lo / step)
        q = np.clip(np.round(values / step) + zero, 0, 255)
        measured = float(np.sum(((q - zero) * step - values) ** 2))
        estimated = expected_error(hist, edges, lo, hi)
        assert abs(estimated - measured) / measured < 0.1, (lo, hi, estimated, measured)


def test_attention_masks_keep_min_max_and_do_not_break_the_histograms() -> None:
    from engine.ops.quantize.integer import ragged_histograms

    collector = ragged_histograms()
    rng = np.random.default_rng(0)
    mask = np.zeros((2, 32), np.float32)
    mask[:, 20:] = np.finfo(np.float32).min  # what transformers adds to padded positions
    for _ in range(2):  # two chunks, batches of unequal sizes
        collector.collect(
            {
                "scores": [rng.standard_normal((2, 32)).astype(np.float32), np.ones((1, 32))],
                "masked": [mask, mask[:1]],
            }
        )
    assert set(collector.histogram_dict) == {"scores"}
    assert collector.extreme == {"masked": (float(np.finfo(np.float32).min), 0.0)}
    ranges, report = choose(collector.histogram_dict)
    assert set(ranges) == {"scores"} and report["tensors"] == 1
