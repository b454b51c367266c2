"""What the worker asks of the engine: one typed spec, built by the runner, sent through the
sandbox's pipe as JSON and received by the engine, with one name per field end to end.

Torch-free, so the worker's parent process builds it without loading the engine's heavy parts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.torchgraph.device import DeviceSetting


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resume(_Spec):
    """Where a retried job continues: after step `start_index - 1`, whose output is `model_path`."""

    start_index: int
    model_path: str
    original_metrics: dict[str, Any]


class InspectSpec(_Spec):
    """Read an uploaded model's inputs, outputs and size."""

    action: Literal["inspect_model"] = "inspect_model"
    model_path: str

    def input_paths(self) -> list[str]:
        return [self.model_path]


class CompressSpec(_Spec):
    """Run a pipeline on a model (the arguments of `engine.pipeline.compress`)."""

    action: Literal["compress"] = "compress"
    model_path: str
    pipeline: list[dict[str, Any]]
    workdir: str
    dataset_path: str | None = None
    # The dataset's id in the service, for `measured_on` (None outside the service).
    dataset_id: str | None = None
    evaluation_task: str = "classification"
    # evaluation.floor: floor keys of engine.quality overriding the task's default floor
    # (null turns a default check off); allow_below_floor: a final result under the floor
    # is `degraded` (the job succeeds with a warning) instead of `rejected`.
    floor: dict[str, float | None] = Field(default_factory=dict)
    allow_below_floor: bool = False
    # Fraction of the dataset kept out of training and used for every measurement;
    # None: 0.3 when a step trains on the dataset, else 0.
    holdout: float | None = None
    export: list[str] = Field(default_factory=lambda: ["onnx"])
    seed: int = 0
    latency_threads: int = 1
    # CPU threads torch trains (and the pre-flight estimate times) with; a rerun with the same
    # count gives the same model.
    train_threads: int = Field(1, ge=1, le=256)
    # Where torch training runs: "cpu", "cuda", or "auto" (cuda when torch can use a GPU);
    # engine.torchgraph.device.resolve_device.
    device: DeviceSetting = "cpu"
    # Other uploaded models a step names (a distillation student): model id -> file.
    models: dict[str, str] = Field(default_factory=dict)
    resume: Resume | None = None
    # The auto search's candidates that earlier attempts of this job finished (their
    # `candidate` events): a retry reuses them instead of building them again.
    search_history: list[dict[str, Any]] = Field(default_factory=list)
    # At most this many training samples (drawn after the held-out split, which stays the
    # job's): the auto search's probes train a candidate briefly on a subset.
    train_samples: int | None = Field(None, ge=1)
    # The job's limits (the worker's settings); None: not limited. Torch training steps are
    # estimated in pre-flight (engine.torchgraph.estimate) and refused when they cannot fit.
    time_limit_s: float | None = None
    memory_limit_mb: int | None = None

    def input_paths(self) -> list[str]:
        """The files the engine reads."""
        paths = [self.model_path, self.dataset_path, *self.models.values()]
        if self.resume is not None:
            paths.append(self.resume.model_path)
        return [p for p in paths if p]
