"""`quantize` on ONNX with onnxruntime's tools: static QDQ (calibrated), dynamic, fp16."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from worker.engine.config import QuantizeConfig
from worker.engine.datasets import Samples
from worker.engine.errors import EngineError
from worker.engine.export import quiet, sort_nodes, strip_debug_metadata
from worker.engine.formats import onnx_opset
from worker.engine.registry import StepContext, register
from worker.engine.runtime import feeds

if TYPE_CHECKING:
    import onnx
    from onnxruntime.quantization import QuantType

CALIBRATION_BATCH = 32
PER_CHANNEL_MIN_OPSET = 13


class CalibrationReader:
    """Streams calibration batches to onnxruntime's calibrator (fixed batch sizes padded)."""

    def __init__(self, samples: Samples, batch: int, fixed: bool) -> None:
        self.samples = samples
        self.batch = batch
        self.fixed = fixed
        self._batches: Iterator[dict[str, np.ndarray]] = iter(())
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:
        self._batches = (f for f, _ in feeds(self.samples, self.batch, pad=self.fixed))


def _save(model: onnx.ModelProto, path: Path) -> None:
    import onnx

    onnx.save(sort_nodes(strip_debug_metadata(model)), str(path))


def _upgrade_opset(src: Path, dst: Path, ctx: StepContext) -> Path | None:
    """Per-channel QDQ needs opset >= 13 (older opsets make an invalid file): convert, or None."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(src))
    opset = onnx_opset(model) or 0
    if opset >= PER_CHANNEL_MIN_OPSET:
        return src
    try:
        converted = version_converter.convert_version(model, PER_CHANNEL_MIN_OPSET)
        onnx.checker.check_model(converted)
    except Exception as exc:
        ctx.warnings.append(
            f"The model uses opset {opset} and could not be upgraded to opset "
            f"{PER_CHANNEL_MIN_OPSET} ({type(exc).__name__}), so weights were quantized "
            "per-tensor instead of per-channel. Re-export with opset >= 13 for per-channel."
        )
        return None
    onnx.save(converted, str(dst))
    ctx.warnings.append(
        f"Upgraded the model from opset {opset} to {PER_CHANNEL_MIN_OPSET} for per-channel "
        "quantization."
    )
    return dst


def _preprocess(src: Path, dst: Path, ctx: StepContext) -> Path:
    """quant_pre_process (optimization + shape inference); retry without symbolic shapes."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    for skip_symbolic in (False, True):
        try:
            with quiet():
                quant_pre_process(str(src), str(dst), skip_symbolic_shape=skip_symbolic)
            return dst
        except Exception:
            continue
    ctx.warnings.append(
        "onnxruntime's quantization pre-processing (shape inference and fusion) failed on this "
        "model; it was quantized without it, which can leave some operators unquantized."
    )
    return src


QUANTIZED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
    "QLinearConv",
    "QLinearMatMul",
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


def _fp16(src: Path, ctx: StepContext) -> Path:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    kinds = {t.data_type for t in model.graph.initializer}
    if onnx.TensorProto.FLOAT16 in kinds and onnx.TensorProto.FLOAT not in kinds:
        raise EngineError(
            "quantization_failed",
            "The model is already float16; converting it again would change nothing.",
            field="pipeline",
        )
    with quiet():
        model = convert_float_to_float16(model, keep_io_types=True)
    _save(model, ctx.output)
    return ctx.output


def _dynamic(src: Path, dst: Path, per_channel: bool, qtype: QuantType, ctx: StepContext) -> None:
    """quantize_dynamic; if onnxruntime lacks an integer kernel it made, keep MatMul/Gemm only."""
    from onnxruntime.quantization import quantize_dynamic

    from worker.engine.runtime import make_session

    with quiet():
        quantize_dynamic(str(src), str(dst), per_channel=per_channel, weight_type=qtype)
    try:
        make_session(dst)
    except Exception as exc:
        with quiet():
            quantize_dynamic(
                str(src),
                str(dst),
                per_channel=per_channel,
                weight_type=qtype,
                op_types_to_quantize=["MatMul", "Gemm"],
            )
        ctx.warnings.append(
            "onnxruntime has no CPU kernel for some dynamically quantized operators here "
            f"({type(exc).__name__}); only MatMul/Gemm were quantized, convolutions stay float. "
            "Use mode 'static' to quantize convolutions."
        )


@register(QuantizeConfig)
def quantize(config: QuantizeConfig, model: Path, ctx: StepContext) -> Path:
    """Write the quantized ONNX to ctx.output."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    try:
        if config.dtype == "fp16":
            ctx.report(0.2, "converting weights and activations to float16")
            return _fp16(model, ctx)
        _refuse_quantized(model)
        per_channel = config.per_channel
        source = model
        if per_channel:
            upgraded = _upgrade_opset(model, ctx.workdir / "opset13.onnx", ctx)
            per_channel = upgraded is not None
            source = upgraded or model
        ctx.report(0.1, "pre-processing (shape inference, fusion)")
        prepared = _preprocess(source, ctx.workdir / "preprocessed.onnx", ctx)
        qtype = QuantType.QInt8 if config.dtype == "int8" else QuantType.QUInt8
        raw = ctx.workdir / "quantized.onnx"
        if config.mode == "dynamic":
            ctx.report(0.3, f"dynamic {config.dtype} quantization")
            _dynamic(prepared, raw, per_channel, qtype, ctx)
        else:
            calibration = ctx.calibration(config.calibration.samples)
            ctx.report(
                0.3,
                f"calibrating ({config.calibration.method}) on {len(calibration)} "
                f"{calibration.source} samples",
            )
            method = {
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile,
            }[config.calibration.method]
            reader = CalibrationReader(
                calibration, ctx.batch or CALIBRATION_BATCH, fixed=ctx.batch is not None
            )
            with quiet():
                quantize_static(
                    str(prepared),
                    str(raw),
                    reader,
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    activation_type=qtype,
                    weight_type=qtype,
                    calibrate_method=method,
                    extra_options={"CalibPercentile": config.calibration.percentile},
                )
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

    _save(onnx.load(str(raw)), ctx.output)
    return ctx.output
