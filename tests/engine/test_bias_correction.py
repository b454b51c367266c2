"""Bias correction (engine.ops.quantize.bias): int8 weight rounding shifts each output channel's
mean by ΔW·E[x]; the corrected bias cancels it, and `quantize` keeps the corrected build when it
measures better."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from engine.io.datasets import Samples
from engine.onnxgraph.graph import weight_layers
from engine.onnxgraph.runtime import make_session
from engine.ops.quantize.bias import correct_biases, input_means
from engine.ops.quantize.weight_only import symmetric_int8
from engine.pipeline import compress
from tests.conftest import export_onnx


class SmallDepthwise(nn.Module):
    """A MobileNet-like block on non-negative (post-ReLU) inputs: conv, depthwise 3×3, 1×1
    projection, pooled into a 16-d output; the few weights per depthwise channel round
    coarsely, which is where a rounding bias shows."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 1, bias=False),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 16),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _model(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    module = SmallDepthwise().eval()
    with torch.no_grad():  # skewed depthwise kernels: one large tap, small positive others
        dw = module.net[2].weight
        dw.uniform_(0.0, 0.05)
        dw[:, :, 0, 0] = 1.0
    return export_onnx(module, torch.rand(1, 3, 16, 16), tmp_path / "dw.onnx")


def _inputs(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((n, 3, 16, 16)) * 2 + 1).astype(np.float32)  # mean 2: a large E[x]


def _rounded(src: Path, dst: Path) -> Path:
    """src with every Conv/Gemm weight replaced by its int8 per-channel rounding (float
    compute): the weight error alone, no activation quantization."""
    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    for layer in weight_layers(model, min_ndim=2):
        w = numpy_helper.to_array(inits[layer.weight])
        q, scale = symmetric_int8(w, layer.out_axis)
        shape = [-1 if i == layer.out_axis else 1 for i in range(w.ndim)]
        rounded = (q * scale.reshape(shape)).astype(np.float32)
        inits[layer.weight].CopyFrom(numpy_helper.from_array(rounded, layer.weight))
    onnx.save(model, str(dst))
    return dst


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return np.asarray(make_session(path).run(None, {"x": x})[0])


def test_corrected_biases_cancel_the_rounding_shift(tmp_path: Path) -> None:
    src = _model(tmp_path)
    calib, held = _inputs(1, 64), _inputs(2, 64)
    means = input_means(src, Samples({"x": calib}, None, "dataset"), None, tmp_path / "probe.onnx")
    done = correct_biases(src, tmp_path / "corrected.onnx", means, True)
    # Every Conv (group 1, depthwise, and the bias-less 1×1, which gets a bias) and the Gemm.
    assert [d.layer for d in done] == [
        "/net/net.0/Conv",
        "/net/net.2/Conv",
        "/net/net.4/Conv",
        "/net/net.7/Gemm",
    ]
    assert all(d.shift_max > 0 for d in done)
    ref = _run(src, held)
    plain = _run(_rounded(src, tmp_path / "plain-rounded.onnx"), held) - ref
    fixed = _run(_rounded(tmp_path / "corrected.onnx", tmp_path / "fixed-rounded.onnx"), held) - ref
    # The per-channel mean error (the bias) mostly goes; the total error goes down with it.
    assert np.abs(fixed.mean(0)).max() <= 0.5 * np.abs(plain.mean(0)).max()
    assert (fixed**2).mean() < (plain**2).mean()


@pytest.mark.slow  # kept out of the fast set (< 2 min on 2 cores)
def test_quantize_builds_and_reports_bias_corrected_variants(tmp_path: Path) -> None:
    src = _model(tmp_path)
    np.savez(tmp_path / "calib.npz", x=_inputs(1, 64))
    result = compress(
        src,
        [{"op": "quantize"}],
        dataset_path=tmp_path / "calib.npz",
        evaluation_task="generic",
        workdir=tmp_path / "job",
    )
    details = result["steps"][0]["details"]
    names = [v["name"] for v in details["variants"]]
    assert "static_int8" in names  # the uncorrected requested build stays a candidate
    assert any(n.endswith("_biascorr") for n in names)
    assert details["bias_corrected"]["per_channel"]
    # The delivered build is the most faithful within the tie band, as always.
    best = max(v["fidelity"]["sqnr_db"] for v in details["variants"])
    chosen = next(v for v in details["variants"] if v["name"] == details["chosen"])
    assert chosen["fidelity"]["sqnr_db"] >= best - 1.0
    off = compress(
        src,
        [{"op": "quantize", "bias_correction": False}],
        dataset_path=tmp_path / "calib.npz",
        evaluation_task="generic",
        workdir=tmp_path / "job-off",
    )
    off_names = [v["name"] for v in off["steps"][0]["details"]["variants"]]
    assert not any(n.endswith("_biascorr") for n in off_names)
