"""Op registry: (config type, backend) -> handler, so a method is a config plus handler(s).

A leaf: it imports no op. Ops register when `engine.ops` is imported (engine/ops/__init__.py).

An ONNX handler gets the current ONNX file and returns the ONNX it wrote. A torch handler gets
the current torch model as a .pt2 file and returns a .pt2 (the pipeline exports it to ONNX for
measuring) or, for ops that end the torch stage (e.g. QAT), an .onnx.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.config import Backend, OpConfig
from engine.context import StepContext
from engine.errors import EngineError

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
