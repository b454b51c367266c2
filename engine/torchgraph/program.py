"""A torch step's model as a program: example inputs, flat outputs, and saving it back as a .pt2
(torch.export, dynamic batch unless the job's batch is fixed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.context import StepContext
from engine.errors import EngineError
from engine.onnxgraph.convert import quiet

if TYPE_CHECKING:
    import torch

EXAMPLE_BATCH = 4


def example_args(ctx: StepContext) -> tuple[torch.Tensor, ...]:
    """One batch of the job's samples per model input (repeated when there are too few)."""
    import torch

    size = ctx.batch or EXAMPLE_BATCH
    arrays = []
    for spec in ctx.inputs:
        data = ctx.samples.inputs[spec.name]
        if len(data) < size:
            data = np.concatenate([data] * (size // len(data) + 1))
        arrays.append(torch.from_numpy(np.ascontiguousarray(data[:size])))
    return tuple(arrays)


def flatten(value: Any) -> list[Any]:
    """A model's outputs (nested tuples/lists) as one flat list."""
    if isinstance(value, (tuple, list)):
        return [v for item in value for v in flatten(item)]
    return [value]


def save_program(
    gm: torch.nn.Module,
    example: tuple[Any, ...],
    out: Path,
    *,
    batch: int | None,
    error_code: str,
    what: str,
) -> Path:
    """Re-export `gm` with torch.export and save it to `out`.

    The batch dimension stays dynamic unless `batch` is fixed. A failure is the caller's
    `error_code` (e.g. prune_failed, training_failed), its message naming `what` was saved.
    """
    import torch

    dynamic: Any = None
    if batch is None:
        dim = torch.export.Dim("batch", min=1, max=65536)
        dynamic = tuple({0: dim} for _ in example)
    try:
        with quiet():
            program = torch.export.export(gm, example, dynamic_shapes=dynamic)
            torch.export.save(program, str(out))
    except Exception as exc:
        raise EngineError(
            error_code,
            f"The {what} could not be re-exported with torch.export ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}).",
            field="pipeline",
        ) from exc
    return out
