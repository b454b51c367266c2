"""Issue #5 through the REST API: distillation, low-rank, weight sharing and presets, run on a
worker. Requests refused at creation (validation, overrides, exports) and the catalog are in
tests/api."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.io.datasets import Samples
from engine.ops.quantize.search import cpu_int8_features
from tests.integration.conftest import ROOT, Stack
from tests.integration.methods import Client, load_npz, ratio, run_onnx

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def api(pg_stack: Stack) -> Client:
    _, headers = pg_stack.new_team("pipelines")
    return Client(pg_stack, headers)


@pytest.fixture(scope="module")
def unlabelled(digits_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("unlabelled") / "digits_x.npz"
    np.savez(path, x=load_npz(digits_files["npz"])["x"])
    return path


# These tests are about what a method does (an archive that decodes, accuracy regained, one
# student against another), not about shipping: their results may be under the quality floor
# (retrained models agree with the original on fewer than 97 % of the samples even where their
# accuracy holds; tests/integration/test_quality_floor_api.py is about the floor).
BELOW_FLOOR_OK = {"allow_below_floor": True}


def _held_out(npz: Path) -> tuple[np.ndarray, np.ndarray]:
    """The samples a training job measures on: the engine's seeded, stratified 30% split."""
    data = load_npz(npz)
    _, held = Samples({"x": data["x"]}, data["labels"], "dataset").split(0.3, 0)
    assert held.labels is not None
    return held.inputs["x"], held.labels


def test_deep_compression_on_the_mlp(
    api: Client, mlp_files: dict[str, Path], tmp_path: Path
) -> None:
    job = api.run(
        mlp_files["pt2"], mlp_files["npz"], preset="deep-compression", evaluation=BELOW_FLOOR_OK
    )
    assert [s["op"] for s in job["steps"]] == ["prune", "weight_share"]
    metrics = job["metrics"]
    final, original = metrics["final"], metrics["original"]
    assert original["size_bytes"] / final["archive_size_bytes"] >= 40
    assert metrics["ratios"]["accuracy_drop"] <= 0.005
    # The archive decodes (with the project's decoder) into exactly the measured model.
    archive = tmp_path / "model.cpz"
    archive.write_bytes(api.artifact(job, "cpz"))
    assert len(archive.read_bytes()) == final["archive_size_bytes"]
    out = tmp_path / "decoded.onnx"
    subprocess.run(
        [sys.executable, "-m", "app.cli", "decode", str(archive), "-o", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    dense = api.artifact(job, "onnx")
    assert out.read_bytes() == dense
    x, y = _held_out(mlp_files["npz"])
    accuracy = float((run_onnx(out.read_bytes(), x).argmax(1) == y).mean())
    assert round(accuracy, 6) == final["accuracy_top1"]  # metrics are stored to 6 decimals


@pytest.mark.exclusive
def test_tiny_on_the_digits_cnn(api: Client, digits_files: dict[str, Path]) -> None:
    job = api.run(digits_files["pt2"], digits_files["npz"], preset="tiny")
    assert [s["op"] for s in job["steps"]] == ["prune", "distill", "quantize"]
    ratios = job["metrics"]["ratios"]
    assert ratio(job, "macs") <= 0.3
    assert ratio(job, "size_bytes") <= 0.1
    assert ratios["accuracy_drop"] <= 0.015
    # Twice as fast where int8 has dot-product instructions (VNNI/AMX, Arm dot product); on
    # x86 without them the int8 kernels gain less on convs this small (1.95x on an AMD EPYC).
    assert ratios["speedup"] >= (2.0 if cpu_int8_features() else 1.5)
    # every step's checkpoint shows how the numbers moved
    sizes = [s["metrics"]["size_bytes"] for s in job["steps"]]
    assert sizes[2] < sizes[0]
    assert all(s["artifact_id"] for s in job["steps"])


PRUNE_70 = {"op": "prune", "granularity": "channels", "sparsity": 0.7, "round_to": None}


def test_distillation_recovers_accuracy_after_pruning(
    api: Client, digits_files: dict[str, Path], unlabelled: Path
) -> None:
    # The prune step's own checkpoint is the pruned model before distillation: every step is
    # measured on the job's held-out samples, the same for both steps.
    pipeline = [PRUNE_70, {"op": "distill", "epochs": 10}]
    same_eval = {"holdout": 0.3, **BELOW_FLOOR_OK}
    distilled = api.run(
        digits_files["pt2"], digits_files["npz"], pipeline=pipeline, evaluation=same_eval
    )
    original = distilled["metrics"]["original"]["accuracy_top1"]
    pruned = distilled["steps"][0]["metrics"]["accuracy_top1"]
    lost = original - pruned
    assert lost > 0.1  # 70 % of the channels without training hurts
    regained = distilled["metrics"]["final"]["accuracy_top1"] - pruned
    # most of it comes back (measured: 0.82 of it on an AVX-512 EPYC, 0.79 on an AVX2-only one:
    # the float sums of training differ by CPU)
    assert regained >= 0.7 * lost
    details = distilled["steps"][1]["details"]
    assert details["teacher"]["accuracy"] == pytest.approx(original, abs=0.02)
    epochs = details["epochs"]  # epoch 0: the step's input, scored on the held-out samples
    assert len(epochs) == 11 and epochs[0]["epoch"] == 0 and "agreement" in epochs[-1]

    # Without labels: soft targets only, quality is agreement with the original.
    distilled_u = api.run(digits_files["pt2"], unlabelled, pipeline=pipeline, evaluation=same_eval)
    before = distilled_u["steps"][0]["metrics"]["agreement_top1"]
    after = distilled_u["metrics"]["final"]["agreement_top1"]
    assert after - before >= 0.8 * (1 - before)
    assert distilled_u["steps"][1]["details"]["alpha"] == 1.0


def test_distilled_width_student_beats_training_from_scratch(
    api: Client, digits_files: dict[str, Path]
) -> None:
    student = {"op": "distill", "student": "width", "width": 0.5, "epochs": 15, "lr": 0.003}
    kd = api.run(
        digits_files["pt2"],
        digits_files["npz"],
        pipeline=[{**student, "alpha": 0.5, "temperature": 4.0}],
        evaluation=BELOW_FLOOR_OK,
    )
    scratch = api.run(  # alpha 0: cross-entropy on the labels only, same init and epochs
        digits_files["pt2"],
        digits_files["npz"],
        pipeline=[{**student, "alpha": 0.0}],
        evaluation=BELOW_FLOOR_OK,
    )
    assert ratio(kd, "params") < 0.35
    assert kd["metrics"]["final"]["params"] == scratch["metrics"]["final"]["params"]
    # Both keep their best held-out epoch now; at 0.5 width both reached 525/539 (0.974) in
    # the last run, so the distilled student is checked to be at least as good (issue #13).
    assert kd["metrics"]["final"]["accuracy_top1"] >= scratch["metrics"]["final"]["accuracy_top1"]


def test_low_rank_then_fine_tune_on_the_mlp(api: Client, mlp_files: dict[str, Path]) -> None:
    job = api.run(
        mlp_files["pt2"],
        mlp_files["npz"],
        pipeline=[{"op": "low_rank", "energy": 0.9}, {"op": "fine_tune", "epochs": 5}],
        export=["onnx", "pt2"],
    )
    assert ratio(job, "params") <= 0.6
    assert job["metrics"]["ratios"]["accuracy_drop"] <= 0.01
    assert api.artifact(job, "pt2")[:2] == b"PK"  # the torch model comes back as a .pt2 too


def test_distill_into_an_uploaded_student(
    api: Client, digits_files: dict[str, Path], tmp_path: Path
) -> None:
    """A student of another team or in ONNX is refused: tests/api/test_pipelines.py."""
    import torch

    from engine.examples import export_model

    torch.manual_seed(1)
    small = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(512, 10),
    )
    files = export_model(small, load_npz(digits_files["npz"])["x"], tmp_path / "student")
    student_id = api.upload("models", files["pt2"])
    job = api.run(
        digits_files["pt2"],
        digits_files["npz"],
        pipeline=[
            {
                "op": "distill",
                "student": "model",
                "student_model_id": student_id,
                "epochs": 8,
                "lr": 0.003,
            }
        ],
        evaluation=BELOW_FLOOR_OK,
    )
    assert ratio(job, "params") < 0.1
    assert job["metrics"]["final"]["accuracy_top1"] >= 0.85
