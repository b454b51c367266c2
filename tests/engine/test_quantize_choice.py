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


def test_the_requested_build_and_its_activation_twin_are_built_first() -> None:
    from engine.ops.quantize.search import _twins_first

    q, other = object(), object()  # the model a build comes from: the same one, or a copy
    requested = Variant("static_int8", "static")
    s8pt = Variant("static_int8_per_tensor", "static", per_channel=False)
    u8 = Variant("static_int8_u8act", "static", activations="uint8")
    u8pt = Variant("static_int8_per_tensor_u8act", "static", per_channel=False, activations="uint8")
    builds: list[Any] = [(q, requested), (q, s8pt), (q, u8), (q, u8pt)]
    assert [v.name for _, v in _twins_first(builds, requested)] == [
        "static_int8",
        "static_int8_u8act",
        "static_int8_per_tensor",
        "static_int8_per_tensor_u8act",
    ]
    # the twin of another model's copy (bias-corrected) is not the requested build's twin
    builds = [(q, requested), (q, s8pt), (other, u8)]
    assert _twins_first(builds, requested) == builds


def test_a_clearly_slower_activation_type_is_not_built_again(tmp_path: Path) -> None:
    from engine.ops.quantize.search import ACTIVATION_SLOW, _without_slow_activations

    q = object()
    rest: list[Any] = [
        (q, Variant("static_int8_biascorr", "static")),
        (q, Variant("static_int8_u8act_biascorr", "static", activations="uint8")),
        (q, Variant("static_int8_u8act_rr7_biascorr", "static", activations="uint8")),
    ]
    s8 = _cand(tmp_path, "static_int8", 1000, 4.3, sqnr_db=14.0)
    u8 = _cand(tmp_path, "static_int8_u8act", 1000, 1.4, sqnr_db=14.0)
    u8.variant = Variant("static_int8_u8act", "static", activations="uint8")
    details: dict[str, Any] = {}
    kept = _without_slow_activations([s8, u8], rest, details)
    assert [v.name for _, v in kept] == [
        "static_int8_u8act_biascorr",
        "static_int8_u8act_rr7_biascorr",
    ]
    assert details["variants_skipped"]["names"] == ["static_int8_biascorr"]
    assert "3.07× slower" in details["variants_skipped"]["why"]
    # Within ACTIVATION_SLOW, both are built on.
    s8.latency_ms = u8.latency_ms * (ACTIVATION_SLOW - 0.01)
    assert _without_slow_activations([s8, u8], rest, {}) == rest
    # A slower build that is more faithful is built on: speed is no reason to lose fidelity.
    s8.latency_ms, s8.fidelity = 4.3, {"sqnr_db": 20.0}
    assert _without_slow_activations([s8, u8], rest, {}) == rest
    # The other way round (uint8 slower; an x86 CPU without VNNI can be so): the uint8 builds go.
    s8.fidelity, s8.latency_ms, u8.latency_ms = {"sqnr_db": 14.0}, 1.0, 2.0
    assert [v.name for _, v in _without_slow_activations([s8, u8], rest, {})] == [
        "static_int8_biascorr"
    ]


def test_with_a_target_the_cheapest_builds_that_meet_it_then_the_widest_margin(
    tmp_path: Path,
) -> None:
    from engine.ops.quantize.search import _cheapest_meeting

    # PP-OCR's direction classifier, target 20 dB: per-channel builds meet it, per tensor not.
    plain = _cand(tmp_path, "u8act", 1000, 1.0, sqnr_db=24.8)
    corrected = _cand(tmp_path, "u8act_biascorr", 1000, 1.0, sqnr_db=33.9)
    big = _cand(tmp_path, "big", 1200, 0.8, sqnr_db=40.0)  # 20% larger: not as cheap
    slow = _cand(tmp_path, "slow", 1000, 1.5, sqnr_db=45.0)  # as small, 1.5x slower
    # As small and as fast: the wider margin over the target, whatever the build order.
    assert _cheapest_meeting([plain, corrected, big, slow]) is corrected
    assert _cheapest_meeting([corrected, plain]) is corrected
    # Within 5% of the smallest file counts as small; then speed before fidelity.
    near = _cand(tmp_path, "near", 1040, 0.5, sqnr_db=21.0)
    assert _cheapest_meeting([plain, corrected, near]) is near
