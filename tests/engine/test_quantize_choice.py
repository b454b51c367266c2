"""How `prefer: quality` picks among measured builds (engine.ops.quantize.search)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.config import QuantizeConfig
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


def test_near_ties_in_latency_never_decide_so_the_same_request_gives_the_same_file(
    tmp_path: Path,
) -> None:
    # int8 and uint8 activations give files of one size whose latencies differ by a few
    # percent from run to run: the build order decides, whichever measured faster this time.
    s8 = _cand(tmp_path, "s8s8", 1000, 1.00, sqnr_db=10.0)
    u8 = _cand(tmp_path, "u8s8", 1000, 0.93, sqnr_db=10.0)
    assert choose_quality([s8, u8]) is s8
    u8.latency_ms, s8.latency_ms = 1.00, 0.93
    assert choose_quality([s8, u8]) is s8
    # A real difference in speed still wins.
    u8.latency_ms, s8.latency_ms = 0.5, 1.0
    assert choose_quality([s8, u8]) is u8


def test_one_decision_on_a_small_selection_set_is_a_tie(tmp_path: Path) -> None:
    # 8 selection photos: 7/8 vs 6/8 is one photo; the 3x faster build stays in the running.
    s8 = _cand(tmp_path, "s8s8", 1000, 3.0, sqnr_db=9.5, agreement_top1=0.875, samples=8)
    u8 = _cand(tmp_path, "u8s8", 1000, 1.0, sqnr_db=10.0, agreement_top1=0.75, samples=8)
    assert choose_quality([s8, u8]) is u8
    # Two photos of eight are not a tie.
    u8.fidelity["agreement_top1"] = 0.625
    assert choose_quality([s8, u8]) is s8


def test_seven_bit_weights_are_tried_only_where_the_int8_kernels_saturate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.ops.quantize import search

    class _Q:
        config = QuantizeConfig(op="quantize", mode="static", dtype="int8")

    s8 = Variant("static_int8", "static")
    u8 = Variant("static_int8_u8act", "static", activations="uint8")
    dyn = Variant("dynamic_int8", "dynamic")
    monkeypatch.setattr(search, "cpu_int8_features", lambda: [])  # AVX2, no VNNI
    names = [v.name for v in search.with_reduced_range(_Q(), [s8, u8, dyn])]  # type: ignore[arg-type]
    assert names == [
        "static_int8",
        "static_int8_u8act",
        "dynamic_int8",
        "static_int8_u8act_rr7",
        "dynamic_int8_rr7",
    ]
    monkeypatch.setattr(search, "cpu_int8_features", lambda: ["avx512_vnni"])
    assert search.with_reduced_range(_Q(), [s8, u8, dyn]) == [s8, u8, dyn]  # type: ignore[arg-type]
