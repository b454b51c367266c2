"""What a handler may use while it runs one step: the StepContext."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from engine.io.datasets import Samples
from engine.io.formats import TensorSpec


class Build(Protocol):
    """Runs a whole pipeline on the job's upload in `workdir` and returns its result; with
    `train_samples`, its training uses at most that many samples (the auto search's probes)."""

    def __call__(
        self, pipeline: list[dict[str, Any]], workdir: Path, train_samples: int | None = None
    ) -> dict[str, Any]: ...


@dataclass
class StepContext:
    """What a handler may use: its data, the model's inputs, a scratch dir, an output path."""

    index: int
    workdir: Path
    output: Path
    inputs: list[TensorSpec]
    samples: Samples
    batch: int | None
    seed: int = 0
    report: Callable[[float, str], None] = lambda fraction, message: None
    warnings: list[str] = field(default_factory=list)
    # The job's uploaded model (the teacher for distillation when it is a .pt2).
    source_model: Path | None = None
    source_format: str | None = None
    # Other uploaded models the pipeline names (e.g. a distillation student), by model id.
    models: dict[str, Path] = field(default_factory=dict)
    # The job's evaluation task, the samples every step is measured on and the original's
    # outputs on them (the training ops keep their best epoch by fidelity there); held_out:
    # those samples are not among `samples` (evaluation.holdout > 0).
    task: str = "classification"
    eval_samples: Samples | None = None
    eval_reference: list[np.ndarray] | None = None
    held_out: bool = False
    # Where the training ops train ("cpu" or "cuda"; the pipeline resolved the job's setting).
    device: str = "cpu"
    # CPU threads torch trains with (CompressSpec.train_threads).
    train_threads: int = 1
    # What a handler adds besides its model file:
    # extra files delivered with the step's model, as (path, format) — e.g. a packed archive;
    extras: list[tuple[Path, str]] = field(default_factory=list)
    # extra metrics merged into the step's measured metrics (e.g. archive_size_bytes);
    metrics: dict[str, Any] = field(default_factory=dict)
    # an op-specific report stored with the step (GET /v1/jobs/{id} → steps[].details).
    details: dict[str, Any] = field(default_factory=dict)
    # warnings for the whole job (GET /v1/jobs/{id} → warnings), besides the step's own.
    job_warnings: list[str] = field(default_factory=list)
    # For the auto search (engine.ops.auto): the job's raw event sink (a `candidate` event per
    # candidate), the dataset file and what the job measures with, the candidates an earlier
    # attempt of this job finished, and `build`, which runs a whole pipeline on the upload with
    # the job's settings (engine.pipeline.run) in a directory of its own and returns its result
    # (`Build`).
    emit: Callable[[dict[str, Any]], None] = lambda event: None
    dataset_path: Path | None = None
    holdout: float = 0.0
    floor: dict[str, float | None] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    original_metrics: dict[str, Any] = field(default_factory=dict)
    build: Build | None = None
    time_limit_s: float | None = None

    def calibration(self, limit: int) -> Samples:
        """At most `limit` samples, drawn reproducibly from the job's data."""
        return self.samples.subset(limit, self.seed)
