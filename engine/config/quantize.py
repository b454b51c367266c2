"""The quantize op's config: dtype and mode, calibration, quality target, preference."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.config.base import Backend, OpConfig


class Calibration(BaseModel):
    """How static quantization picks activation ranges (streamed over the dataset in batches)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    percentile: float = Field(99.999, gt=90, le=100)
    samples: int = Field(256, ge=1, le=100_000, description="at most this many samples")
    per_tensor_ranges: bool = Field(
        True,
        description="minmax, prefer quality: also build the most faithful variant with each "
        "activation tensor's range (min/max or a 99.9-99.999 percentile) chosen by its "
        "expected quantization error, and keep it if it measures better",
    )


class QuantizeTarget(BaseModel):
    """A quality floor: exactly one of max_accuracy_drop (needs labels), min_cosine, min_sqnr_db."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_accuracy_drop: float | None = Field(None, ge=0.0, le=1.0)
    min_cosine: float | None = Field(None, ge=-1.0, le=1.0)
    min_sqnr_db: float | None = Field(None, ge=-100.0, le=200.0)

    @model_validator(mode="after")
    def _exactly_one(self) -> QuantizeTarget:
        given = [k for k, v in self.model_dump().items() if v is not None]
        if len(given) != 1:
            raise ValueError(
                "target takes exactly one of max_accuracy_drop, min_cosine, min_sqnr_db "
                f"(got {', '.join(given) or 'none'})"
            )
        return self

    def describe(self) -> str:
        if self.max_accuracy_drop is not None:
            return f"accuracy drop <= {self.max_accuracy_drop}"
        if self.min_cosine is not None:
            return f"cosine >= {self.min_cosine}"
        return f"SQNR >= {self.min_sqnr_db} dB"


QuantMode = Literal["static", "dynamic", "weight_only", "qat"]
QuantDtype = Literal["int8", "uint8", "int4", "fp16", "bf16", "binary", "ternary"]
# dtype -> the modes it supports (an empty tuple: the dtype takes no mode).
QUANT_MODES: dict[str, tuple[str, ...]] = {
    "int8": ("static", "dynamic", "weight_only", "qat"),
    "uint8": ("static", "dynamic", "qat"),
    "int4": ("weight_only",),
    "fp16": (),
    "bf16": (),
    "binary": ("qat",),  # or no mode: post-training
    "ternary": ("qat",),
}
DEFAULT_MODE = {"int8": "static", "uint8": "static", "int4": "weight_only"}


class QuantizeConfig(OpConfig):
    """Post-training quantization on the ONNX graph.

    * `static` int8/uint8: QDQ, activations calibrated on the dataset (`calibration`);
      `dynamic` int8/uint8: weights int8, activations quantized at run time;
      `weight_only` int8 (DequantizeLinear → float compute) or int4 (MatMulNBits, block 32).
    * `fp16` / `bf16`: float16 graph (inputs/outputs stay float32); bf16 stores weights as
      bfloat16 and casts them to float32 at load (onnxruntime CPU has no bf16 kernels).
    * `binary` / `ternary`: XNOR-Net / TWN weights (α·{−1,+1} or α·{−1,0,+1} per output
      channel); the step's ONNX holds the dequantized weights, a packed `.cbin` file (1 or
      2 bits per weight) is delivered with it. First conv and last classifier stay float.
    * `qat` (int8/uint8/binary/ternary, `.pt2` uploads): from the calibrated post-training
      scales, train `epochs` with the weights fake-quantized (straight-through estimator; int8
      activations too) by distillation from the step's float model with the task's loss; then
      exported as above (static QDQ / packed), delivered only when it scores at least the
      post-training build.
    * `exclude`: node or weight-name patterns (fnmatch) kept float.
    * `range_repairs` (static, default on): weightless nodes where one int8 scale would zero
      part of a tensor stay float: a Concat whose inputs' calibrated ranges differ 16×+ (box
      pixels next to class scores), the weightless tail between the last weight layers and
      each output (score Sigmoid, box decode, Softmax). Weights stay int8; details.repairs
      lists each node and why.
    * `bias_correction` (static/dynamic int8 with prefer quality, default on): the builds are
      also made from a copy of the model whose Conv/Gemm biases absorb the mean shift int8
      weight rounding causes (ΔW·E[x], input means from the samples); the uncorrected
      requested build stays among the candidates (details.bias_corrected, details.variants).
    * `sensitivity`: quantize one layer at a time and rank layers by fidelity
      (steps[].details.sensitivity); it also runs when a build misses its `target`.
    * `smooth` (static/dynamic, default on): when a MatMul's input has a channel 2×+ its
      median, SmoothQuant-rescaled copies (x/s, s·W; alpha 0.5 and 0.75) are quantized too;
      the one that measures best is kept (details.smoothed, details.variants).
    * `target`: after quantizing, measure on the dataset (min_sqnr_db: the worst output
      slice); while it is missed, keep float the weightless ops, then the most sensitive
      layers (1, 2, 4, ...), up to 25% of the weights (details.kept_float, target_met).
    * `prefer`: `quality` builds the requested variant (static int8: also per tensor when
      per_channel is unset, and with uint8 activations) and keeps the most faithful, then
      fastest; `speed` / `size` try more variants (QDQ/QOperator, per-tensor/per-channel,
      uint8 activations, depthwise convs float, dynamic) and keep the fastest / smallest that
      meets the target (speed defaults to min_cosine 0.99).
    """

    op: Literal["quantize"] = "quantize"
    mode: QuantMode | None = None
    dtype: QuantDtype = "int8"
    per_channel: bool | None = Field(
        None,
        description="weights per output channel (true) or per tensor (false); unset: per "
        "channel, and for static int8 per tensor as well, keeping the one measured better",
    )
    symmetric: bool | None = Field(
        None, description="symmetric activations and weights (default: onnxruntime's choice)"
    )
    calibration: Calibration = Calibration()
    exclude: list[str] = Field(
        default_factory=list, description="node / weight name patterns (fnmatch) kept float"
    )
    target: QuantizeTarget | None = None
    prefer: Literal["quality", "speed", "size"] = "quality"
    keep_first_last: bool = Field(
        True,
        description="binary/ternary: keep the first conv and the last classifier layer float",
    )
    range_repairs: bool = Field(
        True,
        description="static: keep float the weightless nodes where one int8 scale would zero "
        "part of a tensor: Concats whose inputs' ranges differ 16×+, and the weightless tail "
        "before each output (details.repairs)",
    )
    smooth: bool = Field(
        True,
        description="static/dynamic int8: also build a SmoothQuant-rescaled variant when a "
        "MatMul input has outlier channels, and keep it when it measures better "
        "(details.smoothed)",
    )
    bias_correction: bool = Field(
        True,
        description="static/dynamic int8, prefer quality: also build from a model whose "
        "Conv/Gemm biases cancel the output shift of int8 weight rounding (ΔW·E[x]), and keep "
        "it when it measures better (details.bias_corrected)",
    )
    compact: bool = Field(
        True,
        description="static/dynamic: shorten the tensor names onnxruntime's quantizer adds, drop "
        "their shape records and all-zero weight zero points: the same graph and outputs in "
        "a smaller file (details.compaction)",
    )
    sensitivity: bool = Field(
        False,
        description="rank layers by quantization sensitivity (also done when a build misses "
        "its target)",
    )
    epochs: int = Field(5, ge=1, le=200, description="qat: training epochs")
    lr: float | None = Field(
        None,
        gt=0,
        le=1,
        description="qat: Adam learning rate (default 1e-4 int8/uint8, 1e-3 binary/ternary)",
    )
    batch_size: int = Field(64, ge=1, le=4096, description="qat: training batch size")

    @model_validator(mode="after")
    def _mode_matches_dtype(self) -> QuantizeConfig:
        allowed = QUANT_MODES[self.dtype]
        if not allowed and self.mode is not None:
            raise ValueError(f"dtype {self.dtype!r} takes no 'mode'; leave 'mode' out")
        if allowed and self.mode is None and self.dtype in DEFAULT_MODE:
            object.__setattr__(self, "mode", DEFAULT_MODE[self.dtype])
        if allowed and self.mode is not None and self.mode not in allowed:
            raise ValueError(
                f"dtype {self.dtype!r} supports mode {' or '.join(map(repr, allowed))}, "
                f"not {self.mode!r}"
            )
        integer = self.dtype in ("int8", "uint8", "int4")
        if not integer and (self.target is not None or self.sensitivity):
            raise ValueError(
                f"target and sensitivity apply to int8/uint8/int4 quantization, not {self.dtype!r}"
            )
        if not integer and self.prefer != "quality":
            raise ValueError(
                f"prefer {self.prefer!r} applies to int8/uint8/int4, not {self.dtype!r}"
            )
        for pattern in self.exclude:
            if not pattern.strip():
                raise ValueError("exclude patterns must be non-empty strings")
        return self

    def backends(self) -> tuple[Backend, ...]:
        return ("torch",) if self.mode == "qat" else ("onnx",)

    def keeps_torch(self) -> bool:
        return False  # QAT trains on torch and delivers a quantized ONNX

    def trains(self) -> bool:
        return self.mode == "qat"

    def torch_field(self) -> str | None:
        return "mode" if self.mode == "qat" else None

    def needs_dataset(self) -> str | None:
        return "quantization-aware training trains on it" if self.mode == "qat" else None

    def needs_labels(self) -> str | None:
        if self.target is not None and self.target.max_accuracy_drop is not None:
            return "target max_accuracy_drop compares accuracy against the labels"
        return None
