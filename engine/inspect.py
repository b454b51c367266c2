"""Inspect an upload: what it is, its inputs and outputs, and proof that it loads and runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.errors import EngineError
from engine.io.formats import (
    detect_format,
    load_exported_program,
    load_onnx,
    onnx_float_params,
    onnx_io,
    onnx_opset,
    pt2_io,
    pt2_params,
    short_error,
)
from engine.onnxgraph.runtime import make_session


def check_onnx_runs(path: str | Path) -> None:
    """Create a CPU onnxruntime session; raises invalid_model when onnxruntime cannot load it."""
    try:
        make_session(path)
    except Exception as exc:
        raise EngineError(
            "invalid_model",
            f"onnxruntime could not load the model: {short_error(exc)}. Check that it uses only "
            "standard ONNX operators (no custom domains) and a supported opset.",
            field="file",
        ) from exc


def inspect_model(path: str | Path) -> dict[str, Any]:
    """Format, inputs, outputs, parameter count and opset; proves the model loads (and runs)."""
    fmt = detect_format(path)
    if fmt == "onnx":
        model = load_onnx(path)
        check_onnx_runs(path)
        inputs, outputs = onnx_io(model)
        params, opset = onnx_float_params(model), onnx_opset(model)
    else:
        ep = load_exported_program(path)
        inputs, outputs = pt2_io(ep)
        params, opset = pt2_params(ep), None
    return {
        "format": fmt,
        "inputs": [s.to_dict() for s in inputs],
        "outputs": [s.to_dict() for s in outputs],
        "params": params,
        "opset": opset,
    }
