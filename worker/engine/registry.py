"""Op registry: config type -> handler, so a method is added by a config plus a handler."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from worker.engine.config import OpConfig
from worker.engine.datasets import Samples
from worker.engine.errors import EngineError
from worker.engine.formats import TensorSpec

ModelKind = Literal["onnx", "torch"]


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
    # The job's uploaded model, for ops that need the torch graph rather than the ONNX.
    source_model: Path | None = None
    source_format: str | None = None

    def calibration(self, limit: int) -> Samples:
        """At most `limit` samples, drawn reproducibly from the job's data."""
        return self.samples.subset(limit, self.seed)


Handler = Callable[[Any, Path, StepContext], Path]


@dataclass(frozen=True)
class OpHandler:
    """A handler and the model kind it consumes and produces (ONNX file or torch module)."""

    fn: Handler
    consumes: ModelKind
    produces: ModelKind


_HANDLERS: dict[type[OpConfig], OpHandler] = {}


def register(
    config_type: type[OpConfig],
    *,
    consumes: ModelKind = "onnx",
    produces: ModelKind = "onnx",
) -> Callable[[Handler], Handler]:
    """Decorator: `fn(config, model_path, ctx) -> output path` handles `config_type`."""

    def wrap(fn: Handler) -> Handler:
        _HANDLERS[config_type] = OpHandler(fn, consumes, produces)
        return fn

    return wrap


def handler_for(config: OpConfig) -> OpHandler:
    """The registered handler for a parsed config."""
    _load_builtin_handlers()
    handler = _HANDLERS.get(type(config))
    if handler is None:
        raise EngineError(
            "unsupported_op",
            f"No handler is registered for op {config.op!r} in this worker; "
            f"available: {', '.join(sorted(c.model_fields['op'].default for c in _HANDLERS))}.",
            field="pipeline",
        )
    return handler


def _load_builtin_handlers() -> None:
    from worker.engine import prune, quantize  # noqa: F401  (register on import)
