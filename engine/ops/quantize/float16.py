"""`quantize` to 16-bit floats: fp16 (weights and activations) or bf16 (weight storage)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.context import StepContext
from engine.errors import EngineError
from engine.onnxgraph.convert import quiet
from engine.onnxgraph.graph import save_clean

if TYPE_CHECKING:
    import onnx


def _refuse_half(model: onnx.ModelProto, dtype: str) -> None:
    import onnx

    kinds = {t.data_type for t in model.graph.initializer}
    half = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    if kinds & half and onnx.TensorProto.FLOAT not in kinds:
        raise EngineError(
            "quantization_failed",
            f"The model is already 16-bit; converting it to {dtype} would change nothing.",
            field="pipeline",
        )


def to_fp16(src: Path, ctx: StepContext) -> Path:
    """float16 weights and activations; graph inputs/outputs stay float32 (keep_io_types).

    onnxruntime's converter keeps the ops on its fp32 block list (e.g. Range, Resize's scales
    and shape arithmetic) in float32 with Casts around them.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    _refuse_half(model, "fp16")
    with quiet():
        model = convert_float_to_float16(model, keep_io_types=True)
    save_clean(model, ctx.output)
    return ctx.output


def to_bf16(src: Path, ctx: StepContext, min_elements: int = 16) -> Path:
    """bfloat16 weight storage: each float initializer with >= min_elements values is stored
    as bfloat16 and a Cast to float32 feeds its consumers, so compute stays float32.

    onnxruntime's CPU provider has no bfloat16 kernels for MatMul/Conv/Gemm, so a graph that
    computes in bf16 would not load; the Cast is supported everywhere and ORT folds it into a
    float32 constant at session start. The file is half the size; latency is unchanged.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    _refuse_half(model, "bf16")
    graph = model.graph
    casts = []
    renamed: dict[str, str] = {}
    kept = []
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        if init.data_type != onnx.TensorProto.FLOAT or array.size < min_elements:
            kept.append(init)
            continue
        stored = f"{init.name}_bf16"
        kept.append(_bf16_tensor(array, stored))
        casts.append(
            helper.make_node(
                "Cast", [stored], [init.name], name=f"{init.name}_cast", to=onnx.TensorProto.FLOAT
            )
        )
        renamed[init.name] = stored
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    ctx.details["bf16_tensors"] = len(renamed)
    save_clean(model, ctx.output)
    return ctx.output


def _bf16_tensor(array: np.ndarray, name: str) -> onnx.TensorProto:
    """Round-to-nearest-even float32 → bfloat16, stored as raw little-endian uint16."""
    import onnx

    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    tensor = onnx.TensorProto()
    tensor.name = name
    tensor.data_type = onnx.TensorProto.BFLOAT16
    tensor.dims.extend(array.shape)
    tensor.raw_data = rounded.astype("<u2").tobytes()
    return tensor
