"""`quantize` on ONNX: the registered op, which hands each dtype to the module that builds it.

- fp16 / bf16: engine.ops.quantize.float16
- binary / ternary: engine.ops.quantize.lowbit (weights and their packed `.cbin` file)
- int8 / uint8 static or dynamic, weight-only int8 / int4: engine.ops.quantize.integer builds
  (repairs.py: mixed ranges kept float; smooth.py: SmoothQuant; bias.py: bias correction),
  engine.ops.quantize.search picks the variants and the one delivered, measure.py measures
  (on samples held out of calibration), fallback.py meets targets
- qat (torch): engine.ops.quantize.qat
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from engine.config import QuantizeConfig
from engine.context import StepContext
from engine.errors import EngineError
from engine.onnxgraph.graph import save_clean
from engine.ops.quantize.float16 import to_bf16, to_fp16
from engine.ops.quantize.integer import prepare_quantizer
from engine.ops.quantize.lowbit import quantize_lowbit
from engine.ops.quantize.measure import selection_split
from engine.ops.quantize.search import search
from engine.ops.registry import register

QUANTIZED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulNBits",
}


def _refuse_quantized(path: Path) -> None:
    import onnx

    found = sorted({n.op_type for n in onnx.load(str(path)).graph.node} & QUANTIZED_OPS)
    if found:
        raise EngineError(
            "quantization_failed",
            f"The model is already integer-quantized (it has {', '.join(found)} nodes); "
            "quantize the float model once instead of stacking int8 steps.",
            field="pipeline",
        )


@register(QuantizeConfig)
def quantize(config: QuantizeConfig, model: Path, ctx: StepContext) -> Path:
    """Write the quantized ONNX to ctx.output."""
    try:
        if config.dtype == "fp16":
            ctx.report(0.2, "converting weights and activations to float16")
            return to_fp16(model, ctx)
        if config.dtype == "bf16":
            ctx.report(0.2, "storing weights as bfloat16")
            return to_bf16(model, ctx)
        _refuse_quantized(model)
        if config.dtype in ("binary", "ternary"):
            return quantize_lowbit(config, model, ctx)
        calibration, select = selection_split(ctx.samples, ctx.seed)
        quantizer = prepare_quantizer(config, model, replace(ctx, samples=calibration))
        refit = ctx.samples if select is not ctx.samples else None
        result = search(quantizer, model, select, refit)
    except EngineError:
        raise
    except Exception as exc:
        text = " ".join(str(exc).split())[:400]
        raise EngineError(
            "quantization_failed",
            f"onnxruntime could not quantize the model ({type(exc).__name__}: {text}). "
            "Try per_channel: false, another mode, or dtype 'fp16'.",
            field="pipeline",
        ) from exc
    import onnx

    save_clean(onnx.load(str(result)), ctx.output)
    return ctx.output
