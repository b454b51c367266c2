"""Issue #4 through the REST API: the quantization catalog on real trained models."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.integration.conftest import Stack
from tests.integration.methods import Client, load_npz, ratio, run_onnx

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def api(pg_stack: Stack) -> Client:
    _, headers = pg_stack.new_team("quantization")
    return Client(pg_stack, headers)


def test_dynamic_int8_transformer_with_a_cosine_target(
    api: Client, transformer: dict[str, Any]
) -> None:
    job = api.run(
        transformer["onnx"],
        transformer["npz"],
        pipeline=[
            {
                "op": "quantize",
                "mode": "dynamic",
                "target": {"min_cosine": 0.995},
                "sensitivity": True,  # ranked and reported even when no fallback needs it
            }
        ],
    )
    assert ratio(job, "size_bytes") <= 0.3
    assert job["metrics"]["final"]["cosine_similarity"] >= 0.995
    details = job["steps"][0]["details"]
    assert details["target_met"] is True
    assert isinstance(details["kept_float"], list)
    ranking = [e for e in details["sensitivity"] if e["measured"]]  # top offenders first
    assert len(ranking) >= 12
    sqnr = [e["sqnr_db_min"] if e["sqnr_db_min"] is not None else np.inf for e in ranking]
    assert sqnr == sorted(sqnr)


def test_int4_weights_on_the_transformer(api: Client, transformer: dict[str, Any]) -> None:
    job = api.run(transformer["onnx"], transformer["npz"], preset="int4-weights")
    data = api.artifact(job)
    model = onnx.load_model_from_string(data)
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) >= 12
    x = load_npz(transformer["npz"])["x"][:8]
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x})
    assert out.shape == (8, 2) and np.isfinite(out).all()
    assert ratio(job, "size_bytes") <= 0.25


def test_fp16_halves_the_size(api: Client, digits_files: dict[str, Path]) -> None:
    job = api.run(digits_files["onnx"], digits_files["npz"], preset="fp16")
    assert 0.45 <= ratio(job, "size_bytes") <= 0.6
    assert job["metrics"]["final"]["agreement_top1"] >= 0.99


def _interleaved_ratio(original: bytes, result: bytes, x: np.ndarray, rounds: int = 30) -> float:
    """Our own measurement: p50 latency of the original over the result's, batch 1, 1 thread,
    the two sessions timed in alternating blocks."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    sessions = [
        ort.InferenceSession(m, options, providers=["CPUExecutionProvider"])
        for m in (original, result)
    ]
    name = sessions[0].get_inputs()[0].name
    times: list[list[float]] = [[], []]
    for _ in range(20):
        for s in sessions:
            s.run(None, {name: x[:1]})
    for r in range(rounds):
        for s, bucket in zip(sessions, times, strict=True):
            for i in range(10):
                feed = {name: x[(r * 10 + i) % len(x)][None]}
                t0 = time.perf_counter()
                s.run(None, feed)
                bucket.append(time.perf_counter() - t0)
    return float(np.median(times[0]) / np.median(times[1]))


@pytest.mark.exclusive
def test_reported_speedup_matches_our_own_measurement(
    api: Client, separable: dict[str, Any]
) -> None:
    job = api.run(separable["onnx"], separable["npz"], pipeline=[{"op": "quantize"}])
    reported = job["metrics"]["ratios"]["speedup"]
    x = load_npz(separable["npz"])["x"][:32]
    ours = _interleaved_ratio(separable["onnx"].read_bytes(), api.artifact(job), x)
    assert reported == pytest.approx(ours, rel=0.15)
    if reported < 0.95:  # slower is said, with a likely cause
        assert any("slower" in w for w in (job["steps"][0]["warnings"] or []) + job["warnings"])


@pytest.mark.exclusive
def test_prefer_speed_is_never_slower_than_the_original(
    api: Client, separable: dict[str, Any]
) -> None:
    job = api.run(
        separable["onnx"],
        separable["npz"],
        pipeline=[{"op": "quantize", "prefer": "speed", "target": {"min_sqnr_db": 20}}],
    )
    details = job["steps"][0]["details"]
    assert len(details["variants"]) >= 2
    chosen = next(v for v in details["variants"] if v["name"] == details["chosen"])
    assert chosen["meets_target"]
    faster = [v for v in details["variants"] if v["meets_target"] and v["speedup"] >= 1.0]
    if faster:  # the chosen one is the fastest that meets the target
        assert chosen["speedup"] == max(v["speedup"] for v in faster)
        assert job["metrics"]["ratios"]["speedup"] >= 0.9
    else:
        assert any("None of the" in w for w in job["steps"][0]["warnings"])
    x = load_npz(separable["npz"])["x"][:4]
    assert run_onnx(api.artifact(job), x).shape[0] == 4


def test_ternary_with_distillation_on_the_mlp(
    api: Client, mlp_files: dict[str, Path], tmp_path: Path
) -> None:
    job = api.run(
        mlp_files["pt2"],
        mlp_files["npz"],
        pipeline=[
            {
                "op": "quantize",
                "mode": "qat",
                "dtype": "ternary",
                "keep_first_last": False,
                "epochs": 10,
            }
        ],
    )
    final, original = job["metrics"]["final"], job["metrics"]["original"]
    assert final["packed_size_bytes"] <= 0.07 * original["size_bytes"]
    assert job["metrics"]["ratios"]["accuracy_drop"] <= 0.03
    packed = tmp_path / "model.cbin"
    packed.write_bytes(api.artifact(job, "cbin"))
    assert len(packed.read_bytes()) == final["packed_size_bytes"]
    from engine.ops.quantize.lowbit import unpack

    assert unpack(packed, tmp_path / "model.onnx").read_bytes() == api.artifact(job, "onnx")
