"""Channel pruning of torchvision-layout CNNs (bench/cnns.py): ResNet-18's residual adds,
MobileNetV2's depthwise convs and ReLU6, MobileNetV3-small's squeeze-excitation and hard-swish.
Small widths, a few training steps on real digits, then prune channels 50 % + distill."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from bench import cnns
from engine.examples import export_model
from engine.pipeline import compress

ARCHS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: cnns.resnet18(10, width=8),
    "mobilenet_v2": lambda: cnns.mobilenet_v2(10, width_mult=0.35),
    "mobilenet_v3_small": lambda: cnns.mobilenet_v3_small(10, width_mult=0.5),
}


def _digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's handwritten digits upsampled to 3×32×32 (each pixel 4×4), standardised."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.kron(digits.images[:n] / 16.0, np.ones((4, 4)))[:, None].repeat(3, axis=1)
    return ((x - 0.3) / 0.4).astype(np.float32), digits.target[:n].astype(np.int64)


def _trained(arch: str, x: np.ndarray, y: np.ndarray) -> nn.Module:
    torch.manual_seed(0)
    model = ARCHS[arch]()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for i in range(0, len(x), 32):
        loss = nn.functional.cross_entropy(
            model(torch.from_numpy(x[i : i + 32])), torch.from_numpy(y[i : i + 32])
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_channels_are_removed_and_the_export_runs_in_onnxruntime(arch: str, tmp_path: Path) -> None:
    x, y = _digits(160)
    model = _trained(arch, x[:96], y[:96])
    widths = {
        name: m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }
    files = export_model(model, x[96:], tmp_path / arch)
    np.savez(tmp_path / "x.npz", x=x[96:])
    result = compress(
        files["pt2"],
        [
            {"op": "prune", "granularity": "channels", "sparsity": 0.5},
            {"op": "distill", "epochs": 1, "batch_size": 16},
        ],
        dataset_path=tmp_path / "x.npz",
        workdir=tmp_path / "w",
    )
    prune = result["steps"][0]["details"]
    after = {e["name"]: e["out_channels"] for e in prune["layers"]}
    assert set(after) == set(widths)  # every layer kept its name through lift and re-export
    classifier = list(widths)[-1]
    assert after[classifier] == widths[classifier] == 10
    # every other layer lost channels (the SE squeeze convs too), about half of each
    for name, before in widths.items():
        if name != classifier:
            assert after[name] < before, name
            assert after[name] <= 0.5 * before + 1, name
    assert prune["rounds"][0]["macs_ratio"] <= 0.5
    final = Path(result["artifacts"][0]["path"])
    session = ort.InferenceSession(str(final), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x[:3]})
    assert logits.shape == (3, 10) and np.isfinite(logits).all()
    convs = [n for n in onnx.load(str(final)).graph.node if n.op_type == "Conv"]
    depthwise = [n for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert bool(depthwise) == (arch != "resnet18")
    assert result["final"]["macs"] <= 0.5 * result["original"]["macs"]
