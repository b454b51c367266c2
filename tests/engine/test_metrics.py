"""Metrics on small hand-built graphs whose true values are known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engine.onnxgraph.metrics import count_macs, quality, static_metrics, weight_metrics


def _mlp(w1: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", w1.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", w2.shape[1]])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _conv() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((16, 3, 3, 3), np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_macs_count_matmul_gemm_and_conv_at_batch_one() -> None:
    w1, w2 = np.ones((64, 300), np.float32), np.ones((300, 10), np.float32)
    assert count_macs(_mlp(w1, w2)) == 64 * 300 + 300 * 10
    assert count_macs(_conv()) == 16 * 10 * 10 * 3 * 3 * 3


def test_macs_come_from_one_run_where_shape_inference_stops(tmp_path: Path) -> None:
    # A contrib op (com.microsoft Gelu) that ONNX shape inference does not know between two
    # MatMuls, as transformers 5's SDPA attention-mask subgraph stops it on a real encoder.
    w1, w2 = np.ones((64, 300), np.float32), np.ones((300, 10), np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Gelu", ["h"], ["g"], domain="com.microsoft"),
            helper.make_node("MatMul", ["g", "w2"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 7, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    path = tmp_path / "gelu.onnx"
    onnx.save(model, str(path))
    assert count_macs(model) is None  # the file alone does not tell
    feed = {"x": np.ones((3, 7, 64), np.float32)}  # three samples of 7 tokens
    assert static_metrics(path, None, feed)["macs"] == 7 * (64 * 300 + 300 * 10)  # per sample
    assert static_metrics(path)["macs"] is None  # no sample to run: unknown, not a guess


def test_params_and_sparsity_count_zeros(tmp_path: Path) -> None:
    w1 = np.ones((8, 4), np.float32)
    w1[:4] = 0
    model = _mlp(w1, np.ones((4, 2), np.float32))
    assert weight_metrics(model) == {"params": 40, "nonzero_params": 24, "sparsity": 0.4}
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    values = static_metrics(path)
    assert values["size_bytes"] == path.stat().st_size
    assert 0 < values["size_zstd_bytes"] < values["size_bytes"]


def test_fidelity_and_accuracy() -> None:
    ref = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, 0.0, 0.5]])
    labels = np.array([0, 2, 1])
    same = quality([ref], [ref], labels, "classification")
    assert same["accuracy_top1"] == round(2 / 3, 6)
    assert same["agreement_top1"] == 1.0 and same["cosine_similarity"] == 1.0
    assert same["sqnr_db"] is None and same["max_abs_error"] == 0.0
    noisy = ref + 0.01
    values = quality([noisy], [ref], labels, "classification")
    assert 30 < values["sqnr_db"] < 60
    assert abs(values["max_abs_error"] - 0.01) < 1e-9
    assert "accuracy_top1" not in quality([noisy], [ref], labels, "embedding")
