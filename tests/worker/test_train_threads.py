"""How many CPU threads a job's torch training gets (worker.runner.train_threads), and that a
rerun on the same count gives the same model bytes (engine.torchgraph.train.fit)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from app.config import Settings
from engine.examples import write_digits_mlp
from engine.pipeline import compress
from worker.runner import train_threads


def _settings(threads: int) -> Settings:
    return Settings(train_threads=threads, data_dir="/tmp/unused")


def test_the_setting_then_omp_num_threads_then_every_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert train_threads(_settings(5)) == 5
    assert train_threads(_settings(0)) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert train_threads(_settings(0)) == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "not-a-number")
    assert train_threads(_settings(0)) == len(os.sched_getaffinity(0))


@pytest.mark.slow
def test_training_on_two_threads_gives_the_same_model_twice(tmp_path: Path) -> None:
    files = write_digits_mlp(tmp_path / "files")
    digests = []
    for run in range(2):
        result = compress(
            files["pt2"],
            [{"op": "fine_tune", "epochs": 1}],
            dataset_path=files["npz"],
            workdir=tmp_path / f"job{run}",
            export=["onnx", "pt2"],
            train_threads=2,
        )
        (step,) = result["steps"]
        assert step["details"]["epochs"], step["details"]
        assert step["details"]["threads"] == 2  # what torch trained on, read inside fit
        pt2 = next(a for a in result["artifacts"] if a["format"] == "pt2")
        digests.append(hashlib.sha256(Path(pt2["path"]).read_bytes()).hexdigest())
    assert digests[0] == digests[1]
