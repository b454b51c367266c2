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


def _cba(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class _XBlock(nn.Module):
    """RegNetX's block: 1×1, 3×3 grouped conv (group width 8, not depthwise), 1×1, residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = _cba(c, c), _cba(c, c, 3, 1, c // 8)
        self.c = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.c(self.b(self.a(x))))


class _ConvNeXtBlock(nn.Module):
    """7×7 depthwise conv, LayerNorm over channels-last, Linear MLP, layer scale, residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pwconv1, self.pwconv2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.pwconv2(nn.functional.gelu(self.pwconv1(y))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class _Net(nn.Module):
    def __init__(self, block: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 4, 4)
        self.b1, self.b2 = block(32), block(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b2(self.b1(self.stem(x))).mean((2, 3)))


@pytest.mark.slow
@pytest.mark.parametrize("block", [_XBlock, _ConvNeXtBlock], ids=["regnet", "convnext"])
def test_grouped_convs_and_layer_scale_lose_channels_too(
    block: Callable[[int], nn.Module], tmp_path: Path
) -> None:
    x, _ = _digits(48)
    torch.manual_seed(0)
    files = export_model(_Net(block).eval(), x, tmp_path / "m")
    np.savez(tmp_path / "x.npz", x=x)
    result = compress(
        files["pt2"],
        [{"op": "prune", "granularity": "channels", "sparsity": 0.5}],
        dataset_path=tmp_path / "x.npz",
        workdir=tmp_path / "w",
    )
    step = result["steps"][0]
    after = {e["name"]: e["out_channels"] for e in step["details"]["layers"]}
    assert after.pop("head") == 10
    before = {"pwconv1": 128}  # the MLP's hidden width; everything else 32
    for name, width in after.items():
        assert width == before.get(name.rpartition(".")[2], 32) // 2, name
    if block is _XBlock:
        # Torch-Pruning rounds a grouped conv's kept count per group against the layer's whole
        # width, which at round_to 8 would leave every block whole; the step says it dropped it
        assert any("grouped convolution" in w for w in step["warnings"])
    session = ort.InferenceSession(result["artifacts"][0]["path"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x[:2]})
    assert logits.shape == (2, 10)
