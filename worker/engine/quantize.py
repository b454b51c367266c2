"""`quantize` on ONNX with onnxruntime's quantization tools (QDQ static, dynamic, fp16)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from worker.engine.config import QuantizeConfig
from worker.engine.datasets import Samples
from worker.engine.errors import EngineError

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 32


class _Reader:
    """Feeds calibration batches to onnxruntime's calibrator, streaming from the samples."""

    def __init__(self, samples: Samples, limit: int, batch: int) -> None:
        self.samples = samples.take(limit)
        self.batch = batch
        self._iter: Iterator[dict[str, np.ndarray]] | None = None
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        assert self._iter is not None
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self.samples.batches(self.batch))


def _opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _preprocess(src: Path, dst: Path) -> tuple[Path, list[str]]:
    """quant_pre_process (shape inference + fusion); symbolic shape inference can fail: retry."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    warnings_out: list[str] = []
    for skip_symbolic in (False, True):
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quant_pre_process(str(src), str(dst), skip_symbolic_shape=skip_symbolic)
            return dst, warnings_out
        except Exception as exc:
            warnings_out.append(f"quant_pre_process failed ({type(exc).__name__}); retried simpler")
    return src, [*warnings_out, "quantizing without pre-processing"]


def _upgrade_opset(path: Path, out: Path, target: int = 13) -> Path:
    import onnx
    from onnx import version_converter

    model = onnx.load(str(path))
    if _opset(model) >= target:
        return path
    try:
        converted = version_converter.convert_version(model, target)
    except Exception as exc:
        raise EngineError(
            "unsupported_model",
            f"The model uses opset {_opset(model)}; per-channel quantization needs opset ≥ 13 and "
            f"the upgrade failed ({exc}). Re-export with opset 13 or newer, or set per_channel: "
            "false.",
        ) from exc
    onnx.save(converted, str(out))
    return out


def quantize_onnx(
    src: Path,
    dst: Path,
    config: QuantizeConfig,
    calibration: Samples,
    workdir: Path,
    static_batch: int | None = None,
) -> list[str]:
    """Write the quantized model to dst; return warnings for the job."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    notes: list[str] = []
    if config.dtype == "fp16":
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        onnx.save(model, str(dst))
        return notes

    source = src
    if config.per_channel:
        source = _upgrade_opset(source, workdir / "opset13.onnx")
        if source != src:
            notes.append("upgraded the model to opset 13 for per-channel quantization")
    prepared, pre_notes = _preprocess(source, workdir / "preprocessed.onnx")
    notes += pre_notes
    qtype = QuantType.QInt8 if config.dtype == "int8" else QuantType.QUInt8
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if config.mode == "dynamic":
                quantize_dynamic(
                    str(prepared), str(dst), per_channel=config.per_channel, weight_type=qtype
                )
            else:
                method = {
                    "minmax": CalibrationMethod.MinMax,
                    "entropy": CalibrationMethod.Entropy,
                    "percentile": CalibrationMethod.Percentile,
                }[config.calibration.method]
                batch = static_batch or (
                    CALIBRATION_BATCH if config.calibration.method == "minmax" else 8
                )
                quantize_static(
                    str(prepared),
                    str(dst),
                    _Reader(calibration, config.calibration.samples, batch),
                    quant_format=QuantFormat.QDQ,
                    per_channel=config.per_channel,
                    activation_type=qtype,
                    weight_type=QuantType.QInt8 if config.dtype == "int8" else QuantType.QUInt8,
                    calibrate_method=method,
                    extra_options={
                        "CalibPercentile": config.calibration.percentile,
                        "CalibTensorRangeSymmetric": False,
                        "WeightSymmetric": True,
                    },
                )
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError(
            "quantization_failed",
            f"onnxruntime could not quantize the model ({type(exc).__name__}: {str(exc)[:400]}). "
            "Try mode 'dynamic', dtype 'fp16', or per_channel: false.",
        ) from exc
    return notes
