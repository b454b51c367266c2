"""Op registry: (config type, backend) -> handler, so a method is a config plus handler(s).

An ONNX handler gets the current ONNX file and returns the ONNX it wrote. A torch handler gets
the current torch model as a .pt2 file and returns a .pt2 (the pipeline exports it to ONNX for
measuring) or, for ops that end the torch stage (e.g. QAT), an .onnx.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.engine.config import Backend, OpConfig
from worker.engine.datasets import Samples
from worker.engine.errors import EngineError
from worker.engine.formats import TensorSpec


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
    # What a handler adds besides its model file:
    # extra files delivered with the step's model, as (path, format) — e.g. a packed archive;
    extras: list[tuple[Path, str]] = field(default_factory=list)
    # extra metrics merged into the step's measured metrics (e.g. archive_size_bytes);
    metrics: dict[str, Any] = field(default_factory=dict)
    # an op-specific report stored with the step (GET /v1/jobs/{id} → steps[].details).
    details: dict[str, Any] = field(default_factory=dict)

    def calibration(self, limit: int) -> Samples:
        """At most `limit` samples, drawn reproducibly from the job's data."""
        return self.samples.subset(limit, self.seed)


Handler = Callable[[Any, Path, StepContext], Path]

_HANDLERS: dict[tuple[type[OpConfig], Backend], Handler] = {}


def register(config_type: type[OpConfig], *, on: Backend = "onnx") -> Callable[[Handler], Handler]:
    """Decorator: `fn(config, model_path, ctx) -> output path` handles `config_type` on `on`."""

    def wrap(fn: Handler) -> Handler:
        _HANDLERS[(config_type, on)] = fn
        return fn

    return wrap


def handler_for(config: OpConfig, backend: Backend) -> Handler:
    """The registered handler for a parsed config on a backend."""
    _load_builtin_handlers()
    handler = _HANDLERS.get((type(config), backend))
    if handler is None:
        available = sorted({f"{c.model_fields['op'].default} ({b})" for c, b in _HANDLERS})
        raise EngineError(
            "unsupported_op",
            f"No handler is registered for op {config.op!r} on {backend} in this worker; "
            f"available: {', '.join(available)}.",
            field="pipeline",
        )
    return handler


def _load_builtin_handlers() -> None:
    from worker.engine import (  # noqa: F401  (handlers register on import)
        low_rank,
        prune,
        prune_torch,
        qat,
        quantize,
        training_ops,
        weight_share,
    )
