"""ONNX uploads whose weights are Constant nodes (as paddle2onnx writes them, e.g. the PP-OCR
direction classifier of the zoo) are compressed like any other: the job's working copy holds
them as initializers, with the same outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from engine.onnxgraph.convert import to_onnx
from engine.pipeline import compress


def _constant_weight_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (16, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, (16,)).astype(np.float32)
    w2 = rng.normal(0, 0.2, (16 * 8 * 8, 10)).astype(np.float32)
    shape = np.array([-1, 16 * 8 * 8], np.int64)

    def const(name: str, value: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))

    nodes = [
        const("w1", w1),
        const("b1", b1),
        const("w2", w2),
        const("shape", shape),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["f"]),
        helper.make_node("MatMul", ["f", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "constants",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def test_constant_weights_become_initializers_with_the_same_outputs(tmp_path: Path) -> None:
    upload = _constant_weight_model(tmp_path / "paddle_like.onnx")
    copy = to_onnx(upload, "onnx", tmp_path / "original.onnx")
    model = onnx.load(str(copy))
    assert sorted(t.name for t in model.graph.initializer) == ["b1", "w1", "w2"]
    # the int64 shape stays a Constant: only float tensors are weights
    assert [n.op_type for n in model.graph.node].count("Constant") == 1
    x = np.random.default_rng(1).normal(size=(4, 3, 8, 8)).astype(np.float32)
    before = ort.InferenceSession(str(upload)).run(None, {"x": x})[0]
    after = ort.InferenceSession(str(copy)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(before, after)


def test_an_upload_with_initializers_is_copied_byte_for_byte(tmp_path: Path) -> None:
    upload = _constant_weight_model(tmp_path / "a.onnx")
    lifted = to_onnx(upload, "onnx", tmp_path / "b.onnx")
    again = to_onnx(lifted, "onnx", tmp_path / "c.onnx")
    assert again.read_bytes() == lifted.read_bytes()


def test_weight_sharing_finds_the_constant_weights(tmp_path: Path) -> None:
    upload = _constant_weight_model(tmp_path / "paddle_like.onnx")
    x = np.random.default_rng(2).normal(size=(32, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x)
    result = compress(
        upload,
        [{"op": "weight_share", "bits": 6}],
        dataset_path=tmp_path / "data.npz",
        evaluation_task="generic",
        workdir=tmp_path / "job",
    )
    (step,) = result["steps"]
    assert step["metrics"]["archive_size_bytes"] < result["original"]["size_bytes"] / 3
    assert result["final"]["sqnr_db"] > 20
