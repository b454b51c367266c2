"""`prune` with granularity `channels`: whole channels removed from a .pt2, measured for real."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engine.errors import EngineError
from engine.pipeline import compress

CHANNELS = {"op": "prune", "granularity": "channels"}


def _weight_shapes(path: str | Path) -> list[tuple[str, tuple[int, ...]]]:
    """(op type, weight shape) of every Conv/Gemm/MatMul with a constant weight, in graph order."""
    model = onnx.load(str(path))
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and node.input[1] in inits:
            out.append((node.op_type, inits[node.input[1]]))
    return out


def _run_plain_ort(path: str | Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


@pytest.mark.exclusive
@pytest.mark.slow
def test_half_the_channels_of_the_digits_cnn(digits_files: dict[str, Path], tmp_path: Path) -> None:
    result = compress(
        digits_files["pt2"],
        [{**CHANNELS, "sparsity": 0.5, "criterion": "magnitude", "fine_tune_epochs": 5}],
        dataset_path=digits_files["npz"],
        workdir=tmp_path,
    )
    original, final = result["original"], result["final"]
    path = result["artifacts"][0]["path"]
    before = _weight_shapes(tmp_path / "original.onnx")
    after = _weight_shapes(path)
    assert len(before) == len(after) == 5
    for (_, old), (_, new) in zip(before[:-1], after[:-1], strict=True):
        assert new[0] < old[0]  # fewer output channels / neurons
    assert after[-1][1][0] == before[-1][1][0] == 10 or after[-1][1][1] == 10  # classes kept
    assert final["macs"] <= 0.35 * original["macs"]
    assert final["params"] <= 0.35 * original["params"]
    assert result["ratios"]["accuracy_drop"] <= 0.015
    assert final["latency_ms_p50"] < original["latency_ms_p50"]
    print(
        f"\ndigits CNN channels 50%: macs {final['macs'] / original['macs']:.3f}x, params "
        f"{final['params'] / original['params']:.3f}x, accuracy {original['accuracy_top1']:.4f}"
        f" -> {final['accuracy_top1']:.4f}, latency p50 {original['latency_ms_p50']}ms -> "
        f"{final['latency_ms_p50']}ms ({final['latency_ms_p50'] / original['latency_ms_p50']:.2f}x)"
    )
    data = np.load(digits_files["npz"])
    logits = _run_plain_ort(path, data["x"][:7])
    assert logits.shape == (7, 10)
    assert np.isfinite(logits).all()
    details = result["steps"][0]["details"]
    assert details["training"] == "cross-entropy on the dataset's labels"
    assert len(details["fine_tune"]) == 5 and "accuracy" in details["fine_tune"][-1]
    assert result["evaluation"]["holdout"] == 0.3  # training data never measured


# Slow set: channels and int8 each stay in the fast set; the REST pipeline tests combine them.
@pytest.mark.slow
def test_channels_then_quantize(digits_files: dict[str, Path], tmp_path: Path) -> None:
    result = compress(
        digits_files["pt2"],
        [{**CHANNELS, "sparsity": 0.5, "fine_tune_epochs": 3}, {"op": "quantize", "dtype": "int8"}],
        dataset_path=digits_files["npz"],
        workdir=tmp_path,
    )
    assert [s["op"] for s in result["steps"]] == ["prune", "quantize"]
    assert result["final"]["size_bytes"] < 0.15 * result["original"]["size_bytes"]
    assert result["ratios"]["accuracy_drop"] <= 0.05


def _residual_model() -> Any:
    from torch import nn

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
            self.block = nn.Sequential(
                nn.Conv2d(32, 32, 3, padding=1, bias=False),
                nn.BatchNorm2d(32),
                nn.ReLU(),
                nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False),  # depthwise
                nn.BatchNorm2d(32),
            )
            self.head = nn.Sequential(
                nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10)
            )

        def forward(self, x: Any) -> Any:
            x = self.stem(x)
            x = (x + self.block(x)).relu()
            return self.head(x)

    return Residual()


@pytest.fixture(scope="module")
def residual_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import torch

    from engine.examples import _digits, accuracy, export_model, train

    out = tmp_path_factory.mktemp("residual")
    x_tr, x_te, y_tr, y_te = _digits(flat=False)
    torch.manual_seed(0)
    model = train(_residual_model(), x_tr, y_tr, epochs=4)
    files = export_model(model, x_te, out / "residual")
    np.savez(out / "digits.npz", x=x_te, labels=y_te)
    return {**files, "npz": out / "digits.npz", "accuracy": accuracy(model, x_te, y_te)}


@pytest.mark.slow
def test_residual_and_depthwise_channels_stay_coupled(
    residual_files: dict[str, Any], tmp_path: Path
) -> None:
    assert residual_files["accuracy"] > 0.9
    result = compress(
        residual_files["pt2"],
        [{**CHANNELS, "sparsity": 0.3, "fine_tune_epochs": 2}],
        dataset_path=residual_files["npz"],
        workdir=tmp_path,
    )
    original, final = result["original"], result["final"]
    path = result["artifacts"][0]["path"]
    shapes = [shape for op, shape in _weight_shapes(path) if op == "Conv"]
    stem, conv, depthwise = shapes
    # The skip connection ties the stem's and the depthwise conv's outputs together.
    assert stem[0] == depthwise[0] < 32
    assert depthwise[1] == 1  # still depthwise: one input channel per group
    assert conv[0] < 32
    assert final["macs"] < 0.8 * original["macs"]
    assert result["ratios"]["accuracy_drop"] <= 0.05
    print(
        f"\nresidual channels 30%: macs {final['macs'] / original['macs']:.3f}x, params "
        f"{final['params'] / original['params']:.3f}x, accuracy {original['accuracy_top1']:.4f}"
        f" -> {final['accuracy_top1']:.4f}, latency p50 {original['latency_ms_p50']}ms -> "
        f"{final['latency_ms_p50']}ms ({final['latency_ms_p50'] / original['latency_ms_p50']:.2f}x)"
    )
    x = np.load(residual_files["npz"])["x"]
    for batch in (1, 5):  # the batch dim stays dynamic
        assert _run_plain_ort(path, x[:batch]).shape == (batch, 10)


def test_channels_on_an_onnx_upload_is_refused_before_work(
    digits_files: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(EngineError) as err:
        compress(digits_files["onnx"], [{**CHANNELS, "sparsity": 0.5}], workdir=tmp_path)
    assert err.value.code == "unsupported_op"
    assert err.value.field == "pipeline[0].granularity"
    assert ".pt2" in str(err.value) and "unstructured" in str(err.value)
    assert not (tmp_path / "original.onnx").exists()


def test_channels_after_an_onnx_only_op_is_refused(
    digits_files: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(EngineError) as err:
        compress(
            digits_files["pt2"],
            [{"op": "quantize", "dtype": "fp16"}, {**CHANNELS, "sparsity": 0.5}],
            workdir=tmp_path,
        )
    assert err.value.field == "pipeline[1]"
    assert "Make quantize the last step" in str(err.value)
    assert not (tmp_path / "original.onnx").exists()


# Slow set: distilling without labels stays in the fast set through the ternary QAT and the
# gradient-without-labels tests.
@pytest.mark.slow
def test_fine_tuning_without_labels_distills_from_the_original(
    digits_files: dict[str, Path], tmp_path: Path
) -> None:
    data = np.load(digits_files["npz"])
    np.savez(tmp_path / "x.npz", x=data["x"])
    result = compress(
        digits_files["pt2"],
        [{**CHANNELS, "sparsity": 0.25, "fine_tune_epochs": 3}],
        dataset_path=tmp_path / "x.npz",
        workdir=tmp_path / "w",
    )
    step = result["steps"][0]
    assert step["details"]["training"].startswith("distillation from the original")
    assert result["final"]["macs"] < result["original"]["macs"]
    assert result["final"]["agreement_top1"] >= 0.9
    assert result["evaluation"]["holdout"] == 0.3
