"""Conversion to a single-file fp32 ONNX: the reference that results are measured against."""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import EngineError
from engine.io.formats import (
    ModelFormat,
    load_exported_program,
    load_onnx,
    pt2_dim_names,
)
from engine.onnxgraph.graph import lift_constants, strip_debug_metadata

if TYPE_CHECKING:
    import onnx


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """torch.onnx prints progress to stdout and warns freely; keep the worker's output clean."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _rename_dims(model: onnx.ModelProto, names: dict[str, str]) -> None:
    values = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    for value in values:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]


def pt2_to_onnx(path: str | Path, out: Path) -> Path:
    """torch.onnx.export(dynamo=True) of the ExportedProgram; dynamic dims stay dynamic."""
    import onnx
    import torch

    program = load_exported_program(path)
    try:
        with quiet():
            torch.onnx.export(program, (), str(out), dynamo=True, external_data=False)
    except Exception as exc:
        raise EngineError(
            "unsupported_model",
            f"The .pt2 program could not be converted to ONNX ({type(exc).__name__}: "
            f"{_first_line(exc)}). Operators without an ONNX translation cannot be compressed "
            "yet; export the model to ONNX yourself and upload that.",
            field="file",
        ) from exc
    model = onnx.load(str(out))
    _rename_dims(model, pt2_dim_names(program))
    onnx.save(strip_debug_metadata(model), str(out))
    return out


def to_onnx(path: str | Path, fmt: ModelFormat, out: Path) -> Path:
    """The model as a checked single-file ONNX at `out`: an ONNX upload is copied byte for byte,
    unless its weights are `Constant` nodes (paddle2onnx), which become initializers
    (graph.lift_constants: the same outputs, weights where the ops look for them)."""
    if fmt == "onnx":
        model = load_onnx(path)
        if lift_constants(model):
            import onnx

            onnx.save(model, str(out))
        else:
            shutil.copyfile(path, out)
    else:
        pt2_to_onnx(path, out)
    load_onnx(out)
    return out


def _first_line(exc: BaseException, limit: int = 400) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return text[:limit]
