"""Pre-flight estimate of torch training (engine.torchgraph.estimate): one real batch of a small
model built here is timed, every training step's estimate is in its details, and a job that
cannot fit its time or memory limit fails before the original is measured."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engine.config import parse_op
from engine.config.prune import MEASURED_PROBE_SAMPLES, measured_probe_counts
from engine.errors import EngineError
from engine.examples import export_model
from engine.pipeline import compress
from engine.torchgraph.estimate import (
    Job,
    Limits,
    Timing,
    check,
    kept_after,
    step_estimate,
    step_work,
)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(nn.functional.max_pool2d(h, 2).flatten(1))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small CNN (untrained: only its cost matters) as a .pt2, and 200 labelled samples."""
    out = tmp_path_factory.mktemp("estimate")
    rng = np.random.default_rng(0)
    x = rng.random((200, 1, 8, 8), dtype=np.float32)
    torch.manual_seed(0)
    files = export_model(SmallCNN().eval(), x[:16], out / "small")
    np.savez(out / "small.npz", x=x, labels=np.arange(200) % 10)
    return {"pt2": files["pt2"], "npz": out / "small.npz"}


def test_a_job_over_its_time_limit_fails_in_preflight_with_the_estimate(
    small: dict[str, Path], tmp_path: Path
) -> None:
    start = time.monotonic()
    with pytest.raises(EngineError) as err:
        compress(
            small["pt2"],
            [{"op": "distill", "epochs": 400, "batch_size": 16}],
            dataset_path=small["npz"],
            workdir=tmp_path,
            time_limit_s=20,
        )
    assert time.monotonic() - start < 60
    assert err.value.code == "estimated_time_exceeds_limit"
    assert err.value.field == "pipeline"
    detail = str(err.value)
    # 140 training samples (30 % held out) in batches of 16, 400 epochs, at the measured time
    assert "× 140 samples × 400 epochs at the measured" in detail
    assert "per batch of 16" in detail and "time limit of 20 s" in detail
    assert "fewer epochs" in detail and "COMPAAS_JOB_TIME_LIMIT_S" in detail
    assert not list(tmp_path.glob("step*"))  # no step ran


def test_a_job_over_its_memory_limit_fails_in_preflight(
    small: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(EngineError) as err:
        compress(
            small["pt2"],
            [{"op": "fine_tune", "epochs": 1}],
            dataset_path=small["npz"],
            workdir=tmp_path,
            memory_limit_mb=64,  # less than the process already holds
        )
    assert err.value.code == "estimated_memory_exceeds_limit"
    assert err.value.field == "pipeline"
    assert "memory limit of 64 MiB" in str(err.value) and "batch_size" in str(err.value)
    assert not list(tmp_path.glob("step*"))


def test_every_training_step_reports_its_estimate_and_fits(
    small: dict[str, Path], tmp_path: Path
) -> None:
    started: dict[int, float] = {}
    took: dict[int, float] = {}

    def progress(event: dict[str, object]) -> None:
        index = event.get("index")
        if event["type"] == "step_started" and isinstance(index, int):
            started[index] = time.monotonic()
        if event["type"] == "step_finished" and isinstance(index, int):
            took[index] = time.monotonic() - started[index]

    result = compress(
        small["pt2"],
        [
            {"op": "prune", "sparsity": 0.5, "fine_tune_epochs": 2, "batch_size": 32},
            {"op": "quantize", "dtype": "fp16"},
        ],
        dataset_path=small["npz"],
        workdir=tmp_path,
        time_limit_s=1800,
        memory_limit_mb=8192,
        progress=progress,
    )
    estimate = result["steps"][0]["details"]["estimate"]
    assert estimate["epochs"] == 2 and estimate["batch_size"] == 32
    assert estimate["batches"] == math.ceil(140 / 32) and estimate["samples"] == 140
    assert estimate["per_batch_s"] > 0 and estimate["parameters"] == sum(
        p.numel() for p in SmallCNN().parameters()
    )
    assert took[0] <= estimate["seconds"] <= estimate["job_seconds"] < 1800
    assert 0 < estimate["memory_mb"] < 8192
    assert "estimate" not in result["steps"][1]["details"]  # quantize fp16 trains nothing


def test_the_work_of_each_training_op() -> None:
    gradual = parse_op(
        {
            "op": "prune",
            "criterion": "gradient",
            "schedule": {"kind": "gradual", "steps": 3, "epochs_per_step": 2},
            "fine_tune_epochs": 1,
            "samples": 100,
        }
    )
    work = step_work(0, gradual, has_labels=False, samples=500)
    assert work is not None
    assert work.epochs == 3 * 2 + 1 and work.teacher  # no labels: distilled from the original
    assert work.scored == 3 * 100  # the gradient criterion scores every round
    assert step_work(0, parse_op({"op": "prune", "sparsity": 0.5}), True, 500) is None  # ONNX
    one_shot_channels = parse_op({"op": "prune", "granularity": "channels"})
    assert step_work(0, one_shot_channels, True, 500) is None  # trains and scores nothing
    qat = step_work(1, parse_op({"op": "quantize", "mode": "qat", "epochs": 3}), True, 500)
    assert qat is not None and qat.fake_quant and qat.teacher and qat.epochs == 3
    assert step_work(2, parse_op({"op": "quantize"}), True, 500) is None
    distill = step_work(0, parse_op({"op": "distill", "epochs": 7}), True, 500)
    assert distill is not None and distill.teacher and distill.epochs == 7


def _job_and_timing() -> tuple[Job, Timing]:
    """1000 training samples, no evaluation; a 1 M-parameter model timed at batch 50: 0.2 s
    per training batch, 0.05 s per forward pass."""
    job = Job(
        train_samples=1000,
        eval_samples=0,
        classification=False,
        fixed_batch=None,
        convert_s=0.0,
        baseline_mb=100.0,
    )
    timing = Timing(
        params=1_000_000, batch=50, load_s=0.0, train_s=0.2, forward_s=0.05, saved_bytes=0
    )
    return job, timing


def test_the_time_is_batches_times_epochs_at_the_measured_batch_and_the_limit_is_kept() -> None:
    work = step_work(0, parse_op({"op": "distill", "epochs": 10, "batch_size": 50}), True, 1000)
    assert work is not None
    job, timing = _job_and_timing()
    entry = step_estimate(work, job, timing, timing)
    assert entry["per_batch_s"] == pytest.approx(0.25)  # student step + teacher forward
    assert entry["batches"] == 20
    # 10 epochs × 20 batches × 0.25 s, plus one latency measurement, with the 25 % margin
    assert entry["seconds"] == pytest.approx((10 * 20 * 0.25 + 5.0) * 1.25, rel=1e-3)
    # weights, gradients, two Adam moments, the best epoch, the teacher: 6 × 4 MB, + 25 %
    assert entry["memory_mb"] == round(100 + 6 * 4e6 / 2**20 * 1.25)
    check({0: entry}, 100.0, Limits(time_s=100.0, memory_mb=200))  # fits: nothing raised
    with pytest.raises(EngineError) as err:
        check({0: entry}, 100.0, Limits(time_s=99.0))
    assert "1.0 M parameters × 1,000 samples × 10 epochs" in str(err.value)
    with pytest.raises(EngineError) as err:
        check({0: entry}, 100.0, Limits(memory_mb=120))
    assert err.value.code == "estimated_memory_exceeds_limit"


def test_a_step_after_a_channel_prune_is_timed_on_the_share_it_keeps() -> None:
    """The pruned model trains after a channel prune: its own batches scale by the channels
    kept (the smaller of the FFN and head fractions), the teacher's forward does not."""
    configs = [
        parse_op({"op": "prune", "granularity": "channels", "sparsity": 0.3}),
        parse_op({"op": "distill", "epochs": 10, "batch_size": 50}),
        parse_op({"op": "prune", "sparsity": 0.9}),  # unstructured: the model keeps its size
        parse_op({"op": "prune", "granularity": "channels", "sparsity": 0.5, "head_sparsity": 0.2}),
        parse_op({"op": "distill", "epochs": 10, "batch_size": 50}),
    ]
    assert kept_after(configs, 0) == 1.0  # the prune's own training is timed unscaled
    assert kept_after(configs, 1) == pytest.approx(0.7)
    assert kept_after(configs, 3) == pytest.approx(0.7)
    assert kept_after(configs, 4) == pytest.approx(0.7 * 0.8)  # heads keep the most: 80 %
    work = step_work(1, configs[1], True, 1000)
    assert work is not None
    job, timing = _job_and_timing()
    whole = step_estimate(work, job, timing, timing)
    pruned = step_estimate(dataclasses.replace(work, kept=0.5), job, timing, timing)
    assert pruned["per_batch_s"] == pytest.approx(0.2 * 0.5 + 0.05)  # + the teacher, whole
    assert pruned["work_kept"] == 0.5 and whole["work_kept"] == 1.0
    assert pruned["seconds"] < whole["seconds"]


def test_a_transformer_channel_prune_counts_its_refits_and_probes() -> None:
    """Scoring, `scope: measured` probes and `reconstruct`'s two passes per block are forward
    passes the prune step runs without training: they are estimated, not left out."""
    minilm = [("attention", 12), ("ffn", 1536)] * 6  # (kind, units) of each block
    # every head count from 12 down to 3, and 13 FFN widths (every 96 channels, multiples of 8)
    assert len(measured_probe_counts("attention", 12, 8)) == 10
    assert len(measured_probe_counts("ffn", 1536, 8)) == 13
    probes = 6 * (10 - 1) + 6 * (13 - 1)  # the full width is not probed
    prune = parse_op({"op": "prune", "granularity": "channels", "sparsity": 0.3})
    assert step_work(0, prune, False, 500) is None  # not a transformer: nothing is refitted
    work = step_work(0, prune, False, 500, blocks=minilm, dataset=True)
    assert work is not None and work.epochs == 0 and work.teacher  # the reference copy
    n = 500  # min(samples 1024, the 500 training samples)
    assert work.score_forward == n + probes * MEASURED_PROBE_SAMPLES + 2 * 12 * n
    plain = parse_op(
        {
            "op": "prune",
            "granularity": "channels",
            "criterion": "magnitude",
            "scope": "layer",
            "reconstruct": False,
        }
    )
    assert step_work(0, plain, False, 500, blocks=minilm, dataset=True) is None
    gradual = parse_op(
        {
            "op": "prune",
            "granularity": "channels",
            "samples": 100,
            "schedule": {"kind": "gradual", "steps": 3, "epochs_per_step": 0},
        }
    )
    two = [("attention", 4), ("ffn", 64)]
    per_block = [len(measured_probe_counts(k, u, 8)) - 1 for k, u in two]
    assert per_block == [3, 6]  # heads 3, 2, 1 (not 4); widths 56, 48, …, 16 (not 64; ≥ 13)
    three = step_work(0, gradual, False, 500, blocks=two, dataset=True)
    assert three is not None
    assert three.score_forward == 3 * (100 + 9 * 64 + 2 * 2 * 100)
    synthetic = step_work(0, prune, False, 500, blocks=minilm, dataset=False)
    assert synthetic is None  # without a dataset: magnitude, layer scope, no refit
