"""bench/zoo.py's issue #12 checks on hand-made rows (no model, no service): each check's
PASS / FAIL / N-A, and the service request bodies."""

from __future__ import annotations

from typing import Any

import pytest

from bench import zoo

pytestmark = pytest.mark.slow


def _row(side: str, **kw: Any) -> dict[str, Any]:
    row = {
        "model": "m",
        "mode": "static",
        "kind": "classifier",
        "side": side,
        "n_held": 8,
        "note": "",
        "size": 0.28,
        "sqnr_db": 20.0,
        "sqnr_db_min": 20.0,
        "worst_slice": "whole",
        "slices": {},
        "task": ("top-1 agreement", 1.0),
        "latency": 2.0,
    }
    if side != "plain":
        row["job"] = {"status": "succeeded", "error": None, "variants": [], "warnings": []}
    row.update(kw)
    return row


def test_default_passes_one_sample_below_plain_and_fails_on_latency_or_slice() -> None:
    plain = _row("plain")
    ok = {"plain": plain, "default": _row("default", task=("top-1 agreement", 0.875))}
    assert zoo.check_default(ok)[0] == "PASS"  # 1/8 below: one sample's worth
    two_off = {"plain": plain, "default": _row("default", task=("top-1 agreement", 0.75))}
    assert zoo.check_default(two_off)[0] == "FAIL"
    slow = {"plain": plain, "default": _row("default", latency=2.2)}
    verdict, detail = zoo.check_default(slow)
    assert verdict == "FAIL" and "latency 1.10× plain" in detail
    zeroed = {"plain": plain, "default": _row("default", sqnr_db_min=19.8)}
    assert zoo.check_default(zeroed)[0] == "FAIL"


def test_default_cosine_floor_and_failed_job() -> None:
    plain = _row("plain", kind="embedding", task=("cosine mean/min", (0.993, 0.98)))
    svc = _row("default", kind="embedding", task=("cosine mean/min", [0.9906, 0.97]))
    assert zoo.check_default({"plain": plain, "default": svc})[0] == "PASS"  # floor 0.9905
    failed = _row("default", failed="boom")
    failed["job"] = {"status": "failed", "error": {"code": "memory_limit_exceeded"}}
    verdict, detail = zoo.check_default({"plain": plain, "default": failed})
    assert verdict == "FAIL" and "memory_limit_exceeded" in detail


def test_target_met_unmet_and_too_large() -> None:
    plain = _row("plain")
    tgt = {"min_sqnr_db": 20.0}
    met = _row("target", target=tgt, size=0.30, sqnr_db_min=21.0)
    met["job"].update(target_met=True, kept_float=["conv1"])
    assert zoo.check_target({"plain": plain, "target": met})[0] == "PASS"
    big = _row("target", target=tgt, size=0.35, sqnr_db_min=21.0)
    big["job"].update(target_met=True, kept_float=["conv1", "conv2"])
    verdict, detail = zoo.check_target({"plain": plain, "target": big})
    assert verdict == "FAIL" and "size 1.25× plain" in detail
    held_below = _row("target", target=tgt, sqnr_db_min=18.0)
    held_below["job"].update(target_met=True, kept_float=[])
    assert zoo.check_target({"plain": plain, "target": held_below})[0] == "FAIL"
    unmet = _row("target", target=tgt)
    unmet["job"].update(
        target_met=False, kept_float=["a", "b"], warnings=["The quality target could not be met"]
    )
    verdict, detail = zoo.check_target({"plain": plain, "target": unmet})
    assert verdict == "N-A" and "2 layer(s)" in detail


def test_target_cosine_on_held_out_mean() -> None:
    tgt = {"min_cosine": 0.995}
    svc = _row("target", kind="embedding", target=tgt, task=("cosine mean/min", (0.996, 0.99)))
    svc["job"].update(target_met=True, kept_float=[])
    assert zoo.check_target({"plain": _row("plain"), "target": svc})[0] == "PASS"


def test_speed_faster_or_no_variant_faster() -> None:
    fast = _row("speed", latency=0.8)
    assert zoo.check_speed({"speed": fast})[0] == "PASS"
    slow = _row("speed", latency=1.4)
    slow["job"].update(variants=[{"speedup": 0.5}, {"speedup": 0.9}], best_variant_speedup=0.9)
    verdict, detail = zoo.check_speed({"speed": slow})
    assert verdict == "PASS" and "no variant was faster" in detail and "0.90" in detail
    slow["job"].update(variants=[{"speedup": 0.5}, {"speedup": 1.3}], best_variant_speedup=1.3)
    assert zoo.check_speed({"speed": slow})[0] == "FAIL"


def test_model_checks_cover_the_requests_present() -> None:
    rows = {"plain": _row("plain"), "speed": _row("speed", latency=0.5)}
    assert [c["check"] for c in zoo.model_checks(rows)] == ["speed"]


def test_request_bodies() -> None:
    spec = zoo.ZOO[0]
    assert zoo.quantize_op(spec, "default") == {"op": "quantize", "mode": "static", "dtype": "int8"}
    assert zoo.quantize_op(spec, "target")["target"] == {"min_sqnr_db": 20.0}
    assert zoo.quantize_op(spec, "speed")["prefer"] == "speed"
    emb = next(s for s in zoo.ZOO if s.key == "minilm")
    assert zoo.quantize_op(emb, "target")["target"] == {"min_cosine": 0.995}
    with pytest.raises(ValueError):
        zoo.quantize_op(spec, "fastest")


def test_job_summary_reads_details_defensively() -> None:
    job = {
        "status": "succeeded",
        "steps": [
            {
                "op": "quantize",
                "warnings": ["w"],
                "details": {
                    "chosen": "static_qdq_per_tensor",
                    "kept_float": ["a"],
                    "target_met": True,
                    "variants": [{"name": "x", "speedup": 0.7}, {"name": "y", "speedup": 1.2}],
                    "repairs": [{"node": "concat0", "why": "mixed ranges"}],
                },
            }
        ],
        "metrics": {"ratios": {"speedup": 1.2}, "final": {"sqnr_db_min": 19.5}},
        "warnings": ["w"],
    }
    got = zoo.job_summary(job)
    assert got["best_variant_speedup"] == 1.2 and got["chosen"] == "static_qdq_per_tensor"
    assert got["service_sqnr_db_min"] == 19.5 and got["rescaled"] is None
    assert got["warnings"] == ["w"]
    assert zoo._brief(got["repairs"]) == "1: concat0"
    assert zoo.job_summary({"status": "failed"})["variants"] == []
