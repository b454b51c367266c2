"""Issue #3 through the REST API: every pruning variant on real trained models. Pruning that an
ONNX upload cannot have is refused at creation: tests/api/test_pipelines.py."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import Stack
from tests.integration.methods import Client, load_npz, ratio, run_onnx, weights

pytestmark = pytest.mark.integration

GRADUAL = {"kind": "gradual", "steps": 3, "epochs_per_step": 3}


@pytest.fixture(scope="module")
def api(pg_stack: Stack) -> Client:
    _, headers = pg_stack.new_team("pruning")
    return Client(pg_stack, headers)


@pytest.fixture(scope="module")
def residual_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A residual CNN with a depthwise-separable block and BatchNorm, trained on digits."""
    import torch
    from torch import nn

    from engine.examples import _digits, export_model, train

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
            self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)  # depthwise
            self.pw = nn.Conv2d(32, 32, 1)
            self.bn = nn.BatchNorm2d(32)
            self.head = nn.Sequential(
                nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(256, 10),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x)
            h = torch.relu(h + self.bn(self.pw(self.dw(h))))  # skip connection
            return self.head(h)

    x_tr, x_te, y_tr, y_te = _digits(flat=False)
    torch.manual_seed(0)
    model = train(Residual(), x_tr, y_tr, epochs=20)
    out = tmp_path_factory.mktemp("residual")
    files = export_model(model, x_te, out / "residual")
    np.savez(out / "residual.npz", x=x_te, labels=y_te)
    return {**files, "npz": out / "residual.npz"}


def _channel_counts(data: bytes) -> list[int]:
    return [int(w.shape[0]) for name, w in weights(data).items() if w.ndim == 4]


@pytest.mark.exclusive
@pytest.mark.parametrize("model", ["digits", "residual"])
def test_channels_gradual_removes_half_the_channels(
    api: Client,
    digits_files: dict[str, Path],
    residual_files: dict[str, Path],
    model: str,
) -> None:
    files = digits_files if model == "digits" else residual_files
    job = api.run(
        files["pt2"],
        files["npz"],
        pipeline=[
            {
                "op": "prune",
                "criterion": "magnitude",
                "granularity": "channels",
                "sparsity": 0.5,
                "schedule": GRADUAL,
            }
        ],
    )
    ratios = job["metrics"]["ratios"]
    assert ratio(job, "macs") <= 0.3
    assert ratios["accuracy_drop"] <= 0.015
    if model == "digits":
        assert 1 / ratios["speedup"] <= 0.6  # latency ≤ 0.6× the original, measured
    else:  # BatchNorm/add/relu overheads at batch 1 do not shrink with the channels
        assert ratios["speedup"] > 1.0
    step = job["steps"][0]
    assert step["details"]["schedule"] == "gradual"
    assert len(step["details"]["rounds"]) == 3
    assert job["metrics"]["evaluation"]["holdout"] == 0.3  # trained data never measured
    # The downloaded ONNX has fewer channels and runs in plain onnxruntime.
    original = files["onnx"].read_bytes()
    pruned = api.artifact(job)
    before, after = _channel_counts(original), _channel_counts(pruned)
    assert len(before) == len(after)
    assert all(a < b for a, b in zip(after, before, strict=True))
    x = load_npz(files["npz"])["x"][:16]
    assert run_onnx(pruned, x).shape == (16, 10)


def test_unstructured_global_90_with_fine_tuning(
    api: Client, digits_files: dict[str, Path]
) -> None:
    job = api.run(
        digits_files["pt2"],
        digits_files["npz"],
        pipeline=[
            {
                "op": "prune",
                "criterion": "magnitude",
                "granularity": "unstructured",
                "sparsity": 0.92,
                "scope": "global",
                "schedule": GRADUAL,
                "fine_tune_epochs": 3,
            }
        ],
    )
    final = job["metrics"]["final"]
    assert final["sparsity"] >= 0.9
    assert final["nonzero_params"] <= 0.1 * job["metrics"]["original"]["params"]
    assert job["metrics"]["ratios"]["accuracy_drop"] <= 0.01
    assert ratio(job, "size_zstd_bytes") <= 0.25
    assert any("size_zstd_bytes" in w for w in job["steps"][0]["warnings"])  # honest: no speedup


def test_two_four_semi_structured(api: Client, digits_files: dict[str, Path]) -> None:
    job = api.run(
        digits_files["onnx"],
        digits_files["npz"],
        pipeline=[{"op": "prune", "granularity": "n:m", "n": 2, "m": 4}],
        # half of every layer's weights at once, no training: about 10 points of accuracy
        # lost, under the floor; this test is about the 2:4 pattern
        evaluation={"allow_below_floor": True},
    )
    pruned = weights(api.artifact(job))
    layers = list(pruned.values())[:-1]  # the classifier is kept whole by default
    assert layers
    for w in layers:
        # groups of 4 consecutive weights along the reduction axis (Conv: in·kh·kw; Gemm: in)
        flat = w.reshape(w.shape[0], -1) if w.ndim == 4 else w
        usable = flat.shape[1] - flat.shape[1] % 4
        blocks = flat[:, :usable].reshape(flat.shape[0], -1, 4)
        assert ((blocks == 0).sum(-1) >= 2).all()


def test_gradient_and_entropy_beat_random(api: Client, digits_files: dict[str, Path]) -> None:
    accuracy: dict[str, float] = {}
    for criterion in ("random", "gradient", "entropy"):
        job = api.run(
            digits_files["pt2"],
            digits_files["npz"],
            pipeline=[
                {
                    "op": "prune",
                    "criterion": criterion,
                    "granularity": "unstructured",
                    "sparsity": 0.8,
                }
            ],
            # one-shot 80 % without training is under the floor (random far under it): the
            # criteria are compared, not shipped
            evaluation={"allow_below_floor": True},
        )
        accuracy[criterion] = job["metrics"]["final"]["accuracy_top1"]
    assert accuracy["gradient"] > accuracy["random"] + 0.1, accuracy
    assert accuracy["entropy"] > accuracy["random"] + 0.1, accuracy


def test_onnx_upload_unstructured_end_to_end(api: Client, mlp_files: dict[str, Path]) -> None:
    job = api.run(
        mlp_files["onnx"],
        mlp_files["npz"],
        pipeline=[{"op": "prune", "sparsity": 0.5, "scope": "global"}],
    )
    assert job["metrics"]["final"]["sparsity"] >= 0.45
    data = load_npz(mlp_files["npz"])
    logits = run_onnx(api.artifact(job), data["x"])
    assert (logits.argmax(1) == data["labels"]).mean() >= 0.9


def test_channels_on_an_architecture_it_cannot_follow_fails_in_preflight(
    api: Client, tmp_path: Path
) -> None:
    """A weight read by a raw matmul (no nn.Linear) would keep stale channels: the job fails
    before any compute, and the job's error names the op and the layer and says what to do."""
    import torch
    from torch import nn

    from engine.examples import export_model

    class RawMatmul(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, padding=1)
            self.head = nn.Parameter(torch.randn(8 * 64, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv(x)).flatten(1) @ self.head

    x = np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)
    files = export_model(RawMatmul().eval(), x, tmp_path / "raw")
    np.savez(tmp_path / "raw.npz", x=x, labels=np.arange(32) % 10)
    resp = api.submit(
        files["pt2"],
        tmp_path / "raw.npz",
        pipeline=[{"op": "prune", "granularity": "channels", "sparsity": 0.5}],
    )
    assert resp.status_code == 202, resp.text
    job = api.stack.wait_job(resp.json()["id"], api.headers, timeout=300)
    assert job["status"] == "failed"
    error = job["error"]
    assert error["code"] == "unsupported_op" and error["field"] == "pipeline"
    assert "aten.matmul" in error["detail"] and "'head'" in error["detail"]  # op and weight
    assert "granularity 'unstructured'" in error["detail"]  # how to fix it
    assert all(step["status"] != "succeeded" for step in job["steps"])
    assert job["metrics"] is None or not job["metrics"].get("original")  # nothing measured
    started = datetime.fromisoformat(job["started_at"])
    assert (datetime.fromisoformat(job["finished_at"]) - started).total_seconds() < 60
