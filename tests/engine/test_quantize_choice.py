"""How `prefer: quality` picks among measured builds (engine.ops.quantize.search)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.ops.quantize.integer import Variant
from engine.ops.quantize.measure import Candidate
from engine.ops.quantize.search import choose_quality


def _cand(tmp: Path, name: str, size: int, ms: float, **fid: Any) -> Candidate:
    path = tmp / f"{name}.onnx"
    path.write_bytes(b"\0" * size)
    cand = Candidate(Variant(name, "static"), path, fid, [], True)
    cand.latency_ms = ms
    return cand


def test_a_classifier_build_that_changes_more_decisions_is_not_as_faithful(
    tmp_path: Path,
) -> None:
    # PP-LCNet orientation on 8 selection photos: per-tensor weights had the higher logit SQNR
    # (within the 1 dB tie band) and the smaller file, but flipped two more decisions.
    per_tensor = _cand(tmp_path, "per_tensor", 900, 1.0, sqnr_db=10.5, agreement_top1=0.625)
    per_channel = _cand(tmp_path, "per_channel", 1000, 1.0, sqnr_db=9.5, agreement_top1=0.875)
    assert choose_quality([per_tensor, per_channel]) is per_channel


def test_without_decisions_the_sqnr_tie_band_then_speed_then_size_decide(tmp_path: Path) -> None:
    small = _cand(tmp_path, "small", 900, 1.0, sqnr_db=10.5)
    big = _cand(tmp_path, "big", 1000, 1.0, sqnr_db=9.8)
    slow = _cand(tmp_path, "slow", 800, 2.0, sqnr_db=10.4)
    worse = _cand(tmp_path, "worse", 100, 0.5, sqnr_db=8.0)  # outside the 1 dB band
    assert choose_quality([small, big, slow, worse]) is small
