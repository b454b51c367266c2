"""bench/zoo.py's measuring parts on arrays and a tiny model made here (no wheel download,
no service): a zeroed slice of a mixed-range output shows in sqnr_db_min, the plain call's
per-tensor retry below opset 13 gives a file that loads, held-out rows never repeat calibration
rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bench import zoo

pytestmark = pytest.mark.slow


def _detector_like() -> zoo.Spec:
    return zoo.Spec(
        "det", "", "x==0", "m.onnx", "detector", "static", "generic",
        lambda n, s: {}, slices={"boxes": (0, 4), "scores": (4, 22)},
    )  # fmt: skip


def test_zeroed_score_slice_shows_in_worst_slice_not_in_whole_output() -> None:
    rng = np.random.default_rng(0)
    ref = np.concatenate(
        [rng.uniform(0, 320, (8, 4, 50)), rng.uniform(0, 1, (8, 18, 50)) ** 4], axis=1
    ).astype(np.float32)
    test = ref.copy()
    test[:, :4] += rng.normal(0, 0.5, test[:, :4].shape).astype(np.float32)
    test[:, 4:] = 0.0  # what a shared int8 scale for 0..320 and 0..1 does to the scores
    got = zoo.fidelity(_detector_like(), [ref], [test])
    assert got["sqnr_db"] > 30
    assert got["worst_slice"] == "scores"
    assert got["sqnr_db_min"] == pytest.approx(0.0, abs=1e-6)
    assert got["slices"]["boxes"] > 40


def test_channel_slices_for_a_dense_output_and_none_for_a_flat_one() -> None:
    spec = zoo.Spec("d", "", "x==0", "m", "dense", "static", "generic", lambda n, s: {})
    assert len(zoo.slices_of(spec, np.zeros((2, 3, 8, 8)))) == 3
    assert zoo.slices_of(spec, np.zeros((2, 384))) == {}
    assert zoo.sqnr_db(np.ones(4), np.ones(4)) == float("inf")


def _opset11_conv(path: Path) -> Path:
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(8, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=7)
    onnx.save(model, str(path))
    return path


def test_plain_static_call_below_opset_13_falls_back_to_a_loadable_per_tensor_file(
    tmp_path: Path,
) -> None:
    src = _opset11_conv(tmp_path / "m.onnx")
    calib = {"x": np.random.default_rng(2).normal(size=(4, 3, 16, 16)).astype(np.float32)}
    spec = zoo.Spec("c", "", "x==0", "m", "classifier", "static", "generic", lambda n, s: {})
    note = zoo.plain_quantize(spec, src, calib, tmp_path / "q.onnx")
    (out,) = zoo.run_all(tmp_path / "q.onnx", calib)
    (ref,) = zoo.run_all(src, calib)
    assert "per-tensor" in note
    assert zoo.sqnr_db(ref, out) > 20


def test_held_out_rows_that_repeat_a_calibration_row_are_dropped() -> None:
    calib = {"a": np.arange(12).reshape(6, 2), "b": np.zeros((6, 1))}
    held = {"a": np.array([[0, 1], [100, 101], [4, 5]]), "b": np.zeros((3, 1))}
    kept = zoo.disjoint(calib, held)
    assert kept["a"].tolist() == [[100, 101]]
    assert kept["b"].shape == (1, 1)


def test_sentences_differ_between_calibration_and_held_out_seeds() -> None:
    calib = zoo.sentences(64, zoo.SEED + 1)
    held = zoo.sentences(64, zoo.SEED + 2)
    assert calib != held and len(set(calib)) > 50
