"""Compaction of quantized files (engine.onnxgraph.compact): onnxruntime's generated names,
their shape records and all-zero weight zero points go; the graph computes exactly the same,
the float model's names stay, and the weight counts read the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from engine.onnxgraph.compact import compact, tensor_names
from engine.onnxgraph.metrics import weight_metrics
from engine.onnxgraph.runtime import make_session
from engine.pipeline import compress
from tests.conftest import export_onnx


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 24, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(24, 24, 3, padding=1, groups=24),
            nn.ReLU(),
            nn.Conv2d(24, 32, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Reader:
    def __init__(self, x: np.ndarray) -> None:
        self.batches = iter([{"x": x[i : i + 1]} for i in range(len(x))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def _inputs(n: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, *shape)).astype(np.float32)


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return np.asarray(make_session(path).run(None, {"x": x})[0])


def _zero_point_inputs(path: Path) -> list[np.ndarray]:
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [
        inits[n.input[2]]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and len(n.input) == 3 and n.input[0] in inits
    ]


def test_compacted_static_file_computes_the_same_in_fewer_bytes(tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    torch.manual_seed(0)
    src = export_onnx(ConvNet(), torch.rand(1, 3, 16, 16), tmp_path / "conv.onnx")
    x = _inputs(16, (3, 16, 16))
    dst = tmp_path / "q.onnx"
    quantize_static(
        str(src),
        str(dst),
        Reader(x),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    before_out, before_weights = _run(dst, x), weight_metrics(onnx.load(str(dst)))
    assert any(not zp.any() for zp in _zero_point_inputs(dst))  # symmetric weights: zeros
    size = dst.stat().st_size
    float_names = tensor_names(src)

    done = compact(dst, float_names)

    assert done is not None and done.names_shortened > 0 and done.zero_points_dropped > 0
    assert dst.stat().st_size == done.bytes_after < size
    assert done.as_dict()["bytes_saved"] == size - dst.stat().st_size
    np.testing.assert_array_equal(_run(dst, x), before_out)  # bit for bit
    assert weight_metrics(onnx.load(str(dst))) == before_weights
    # the int32 bias zero points went; the weights' stay (onnxruntime's kernel choice reads them)
    kept = _zero_point_inputs(dst)
    assert kept and all(zp.dtype in (np.int8, np.uint8) for zp in kept)
    assert any(not zp.any() for zp in kept)
    model = onnx.load(str(dst))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["x"]
    assert [o.name for o in model.graph.output] == ["out"]
    names = tensor_names(dst)
    # every name the float model had and the quantized one still uses is unchanged, and the
    # quantizer's own names are gone
    assert not any(n.endswith(("_quantized", "_scale", "_zero_point")) for n in names)
    assert {n.name for n in model.graph.node if n.op_type == "Conv"} == {
        n.name for n in onnx.load(str(src)).graph.node if n.op_type == "Conv"
    }


def test_compacted_dynamic_file_keeps_its_weight_counts(tmp_path: Path) -> None:
    from onnxruntime.quantization import quantize_dynamic

    torch.manual_seed(0)
    src = export_onnx(Mlp(), torch.rand(1, 64), tmp_path / "mlp.onnx")
    dst = tmp_path / "q.onnx"
    quantize_dynamic(str(src), str(dst), per_channel=True)
    x = _inputs(8, (64,))
    before_out, before_weights = _run(dst, x), weight_metrics(onnx.load(str(dst)))
    # the per-channel weight scales are quantization parameters, not weights
    assert before_weights["params"] == 64 * 128 + 128 + 128 * 16 + 16

    assert compact(dst, tensor_names(src)) is not None
    np.testing.assert_array_equal(_run(dst, x), before_out)
    assert weight_metrics(onnx.load(str(dst))) == before_weights


def test_subgraphs_are_left_alone(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y1"])],
        "b",
        [],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [1])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
        "g",
        [
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "if.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert compact(path, frozenset()) is None


@pytest.mark.slow  # a quantize job: kept out of the fast set
def test_quantize_delivers_the_compacted_file_and_reports_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = export_onnx(ConvNet(), torch.rand(1, 3, 16, 16), tmp_path / "conv.onnx")
    np.savez(tmp_path / "calib.npz", x=_inputs(48, (3, 16, 16)))
    sizes = {}
    for compacted in (True, False):
        result = compress(
            src,
            [{"op": "quantize", "per_channel": True, "compact": compacted}],
            dataset_path=tmp_path / "calib.npz",
            evaluation_task="generic",
            workdir=tmp_path / f"job-{compacted}",
        )
        step = result["steps"][0]
        sizes[compacted] = step["metrics"]["size_bytes"]
        if compacted:
            assert step["details"]["compaction"]["bytes_saved"] > 0
            chosen = step["details"]["chosen"]
            fid = next(v for v in step["details"]["variants"] if v["name"] == chosen)
        else:
            assert "compaction" not in step["details"]
            assert step["details"]["chosen"] == chosen
            # the same build, measured the same: compaction changes no output
            other = next(v for v in step["details"]["variants"] if v["name"] == chosen)
            assert other["fidelity"]["sqnr_db"] == fid["fidelity"]["sqnr_db"]
    assert sizes[True] < 0.9 * sizes[False]
