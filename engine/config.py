"""Versioned, serializable op configs; torch-free, so the API validates with the same classes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Backend = Literal["onnx", "torch"]


class OpConfig(BaseModel):
    """Base for op configs: strict keys, a type tag (`op`) and a schema version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    op: str
    version: Literal[1] = Field(1, description="config schema version; 1 is the only one")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def backends(self) -> tuple[Backend, ...]:
        """Where this op can run: on the ONNX graph, on the torch model (a .pt2), or either.

        Ops that train, or that change layer shapes, need the torch model; the pipeline keeps
        one only while the upload is a .pt2 and every earlier step ran on torch.
        """
        return ("onnx",)

    def keeps_torch(self) -> bool:
        """Whether running on torch still leaves a torch model for later steps."""
        return True

    def torch_field(self) -> str | None:
        """The config field that makes this op need the torch model, for error messages."""
        return None

    def trains(self) -> bool:
        """Whether the op trains on the job's dataset (then part of it is held out)."""
        return False

    def needs_labels(self) -> str | None:
        """Why this op needs a dataset with labels (None: it does not)."""
        return None

    def needs_dataset(self) -> str | None:
        """Why this op needs a dataset at all (None: synthetic inputs do)."""
        return None


class Calibration(BaseModel):
    """How static quantization picks activation ranges (streamed over the dataset in batches)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    percentile: float = Field(99.999, gt=90, le=100)
    samples: int = Field(256, ge=1, le=100_000, description="at most this many samples")


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
    * `qat` (int8/uint8/binary/ternary, `.pt2` uploads): train `epochs` with the weights
      fake-quantized (straight-through estimator; int8 activations too), labels → cross-entropy,
      none → distillation from the original; then exported as above (static QDQ / packed).
    * `exclude`: node or weight-name patterns (fnmatch) kept float.
    * `sensitivity`: quantize one layer at a time and rank layers by fidelity
      (steps[].details.sensitivity); it also runs whenever a `target` is given.
    * `target`: after quantizing, measure on the dataset; while it is missed, keep the most
      sensitive layers float one at a time (details.kept_float, details.target_met).
    * `prefer`: `quality` quantizes as asked; `speed` / `size` try variants (QDQ/QOperator,
      per-tensor/per-channel, depthwise convs float, dynamic) and keep the fastest / smallest
      that meets the target (speed defaults to min_sqnr_db 20).
    """

    op: Literal["quantize"] = "quantize"
    mode: QuantMode | None = None
    dtype: QuantDtype = "int8"
    per_channel: bool = True
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
    sensitivity: bool = Field(
        False,
        description="rank layers by quantization sensitivity (always done when target is set)",
    )
    epochs: int = Field(5, ge=1, le=200, description="qat: training epochs")
    lr: float | None = Field(
        None,
        gt=0,
        le=1,
        description="qat: Adam learning rate (default 1e-4 int8, 1e-3 binary/ternary)",
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


class Schedule(BaseModel):
    """One-shot pruning, or `steps` rounds to the target sparsity with training in between."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["one_shot", "gradual"] = "one_shot"
    steps: int = Field(4, ge=1, le=50, description="rounds (gradual)")
    epochs_per_step: int = Field(1, ge=0, le=50, description="training epochs after each round")


class PruneConfig(OpConfig):
    """Zero the least important weights (unstructured, N:M) or remove whole channels.

    Criteria: `magnitude` (L1/L2 norm of the weights), `gradient` (first-order Taylor,
    |w·∂L/∂w| accumulated over the dataset; task loss with labels, KL to the original's
    outputs without), `entropy` (of each output channel's activation distribution over the
    dataset; unstructured/N:M spread a channel's score over its weights by magnitude) and
    `random` (baseline). A `gradual` schedule prunes in `steps` rounds with a cubic ramp and
    trains `epochs_per_step` epochs after each (labels → cross-entropy, no labels →
    distillation from the original); `fine_tune_epochs` trains once more at the end.
    """

    op: Literal["prune"] = "prune"
    criterion: Literal["magnitude", "gradient", "entropy", "random"] = "magnitude"
    norm: Literal["l1", "l2"] = "l1"
    granularity: Literal["unstructured", "n:m", "channels"] = "unstructured"
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    scope: Literal["layer", "global"] = "layer"
    schedule: Schedule = Schedule()
    n: int = Field(2, ge=1, description="zeros per group of m (n:m granularity)")
    m: int = Field(4, ge=2, le=16)
    ignore: list[str] = Field(default_factory=list, description="layer/weight name patterns")
    include_last_layer: bool = False
    fine_tune_epochs: int = Field(0, ge=0, le=100, description="recovery epochs at the end")
    lr: float = Field(1e-3, gt=0, le=1, description="Adam learning rate for training")
    batch_size: int = Field(64, ge=1, le=4096)
    samples: int = Field(1024, ge=1, le=100_000, description="samples scored (gradient/entropy)")
    round_to: int | None = Field(
        8,
        ge=1,
        le=256,
        description=(
            "channels: kept channel counts are rounded down to a multiple of this (onnxruntime's "
            "blocked CPU conv kernels run odd counts slower); null keeps the exact ratio"
        ),
    )

    @model_validator(mode="after")
    def _n_below_m(self) -> PruneConfig:
        if self.n >= self.m:
            raise ValueError(f"n ({self.n}) must be smaller than m ({self.m})")
        if self.granularity == "n:m" and self.schedule.kind == "gradual":
            raise ValueError("an n:m pattern is reached in one step: use schedule one_shot")
        return self

    def trains(self) -> bool:
        gradual = self.schedule.kind == "gradual" and self.schedule.epochs_per_step > 0
        return gradual or self.fine_tune_epochs > 0

    def backends(self) -> tuple[Backend, ...]:
        torch_only = (
            self.granularity == "channels"
            or self.criterion in ("gradient", "entropy")
            or self.schedule.kind == "gradual"
            or self.fine_tune_epochs > 0
        )
        return ("torch",) if torch_only else ("onnx", "torch")

    def torch_field(self) -> str | None:
        if self.granularity == "channels":
            return "granularity"
        if self.criterion in ("gradient", "entropy"):
            return "criterion"
        if self.schedule.kind == "gradual":
            return "schedule"
        return "fine_tune_epochs" if self.fine_tune_epochs else None

    def needs_dataset(self) -> str | None:
        if self.criterion in ("gradient", "entropy"):
            return f"the {self.criterion} criterion scores weights on the dataset's samples"
        if self.trains():
            return "pruning with training (gradual schedule or fine_tune_epochs) trains on it"
        return None


class FineTuneConfig(OpConfig):
    """Supervised recovery training on the dataset's labels (Adam, cross-entropy)."""

    op: Literal["fine_tune"] = "fine_tune"
    epochs: int = Field(5, ge=1, le=200)
    lr: float = Field(1e-3, gt=0, le=1)
    batch_size: int = Field(64, ge=1, le=4096)

    def backends(self) -> tuple[Backend, ...]:
        return ("torch",)

    def trains(self) -> bool:
        return True

    def needs_dataset(self) -> str | None:
        return "fine_tune trains on it"

    def needs_labels(self) -> str | None:
        return "fine_tune is supervised (use distill to train without labels)"


class DistillConfig(OpConfig):
    """Teacher–student distillation; the teacher is the job's original model.

    Loss α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1−α)·CE(y, z_s); without labels α = 1
    (soft targets only). The student is the pipeline's current model (`student: "current"`),
    the original with every hidden layer's width scaled by `width` and freshly initialised
    (`student: "width"`), or another uploaded .pt2 (`student_model_id`).
    `feature_layers` pairs [student layer, teacher layer] add an MSE loss between their outputs
    after a learned 1×1 projection, weighted by `feature_weight`.
    """

    op: Literal["distill"] = "distill"
    student: Literal["current", "width", "model"] = "current"
    width: float = Field(0.5, gt=0, le=1, description="student: width — kept fraction of channels")
    student_model_id: str | None = Field(None, description="student: model — an uploaded .pt2")
    temperature: float = Field(4.0, gt=0, le=100)
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the soft (teacher) term")
    epochs: int = Field(10, ge=1, le=500)
    lr: float = Field(1e-3, gt=0, le=1)
    batch_size: int = Field(64, ge=1, le=4096)
    feature_layers: list[tuple[str, str]] = Field(
        default_factory=list, description="[student layer, teacher layer] pairs"
    )
    feature_weight: float = Field(1.0, ge=0, le=100)

    @model_validator(mode="after")
    def _student_source(self) -> DistillConfig:
        if (self.student == "model") != (self.student_model_id is not None):
            raise ValueError(
                "give student_model_id exactly when student is 'model' (an uploaded .pt2)"
            )
        return self

    def backends(self) -> tuple[Backend, ...]:
        return ("torch",)

    def trains(self) -> bool:
        return True

    def torch_field(self) -> str | None:
        return "student"

    def needs_dataset(self) -> str | None:
        return "the student learns the teacher's outputs on its samples"


OPS: dict[str, type[OpConfig]] = {
    "quantize": QuantizeConfig,
    "prune": PruneConfig,
    "fine_tune": FineTuneConfig,
    "distill": DistillConfig,
}


def parse_op(data: dict[str, Any]) -> OpConfig:
    """Parse one pipeline step; raises ValueError naming the valid ops for an unknown one."""
    op = data.get("op") if isinstance(data, dict) else None
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; valid ops: {', '.join(sorted(OPS))}")
    return OPS[op].model_validate(data)


def parse_pipeline(steps: list[dict[str, Any]]) -> list[OpConfig]:
    return [parse_op(step) for step in steps]


class PipelineError(ValueError):
    """A pipeline that cannot run as ordered; `field` names the step at fault."""

    def __init__(self, detail: str, field: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field


def plan_pipeline(
    configs: list[OpConfig],
    model_format: str,
    *,
    has_dataset: bool = True,
    has_labels: bool = True,
) -> list[Backend]:
    """Where each step runs (torch or onnx), or PipelineError saying why the order cannot work.

    A torch model exists while the upload is a .pt2 and every earlier step ran on torch (and
    kept it). An op that can run on either backend runs on torch when a later op needs torch,
    so the torch model survives for it; otherwise on ONNX.
    """
    plan: list[Backend] = []
    torch_available = model_format == "pt2"
    lost_at: int | None = None
    for index, config in enumerate(configs):
        where = f"pipeline[{index}]"
        earlier = [i for i, c in enumerate(configs[:index]) if isinstance(c, QuantizeConfig)]
        if earlier:
            prev = configs[earlier[0]]
            assert isinstance(prev, QuantizeConfig)
            stacked = (
                "Stacking quantization on quantization is refused: "
                if isinstance(config, QuantizeConfig)
                else ""
            )
            raise PipelineError(
                f"{stacked}{where} ({config.op}) comes after pipeline[{earlier[0]}] (quantize "
                f"{prev.dtype}), whose output has quantized weights that no op can take as "
                "input. Make quantize the last step (e.g. prune → distill → quantize), and "
                "quantize once.",
                where,
            )
        if not has_dataset and (why := config.needs_dataset()):
            raise PipelineError(
                f"{where} ({config.op}) needs a dataset: {why}. Attach dataset_id.", where
            )
        if has_dataset and not has_labels and (why := config.needs_labels()):
            raise PipelineError(
                f"{where} ({config.op}) needs a dataset with a `labels` array: {why}.", where
            )
        options = config.backends()
        later_needs_torch = any(c.backends() == ("torch",) for c in configs[index + 1 :])
        if options == ("torch",):
            if not torch_available:
                if model_format != "pt2":
                    detail = (
                        f"{where} ({config.op}) needs the torch model, and the upload is "
                        f"{model_format}: upload a torch.export .pt2 "
                        "(torch.export.save(torch.export.export(model, args), 'model.pt2'))."
                    )
                    if isinstance(config, PruneConfig):
                        detail += (
                            " On ONNX, prune supports criterion magnitude/random with "
                            "granularity 'unstructured' or 'n:m' and a one_shot schedule."
                        )
                else:
                    prev = configs[lost_at or 0]
                    detail = (
                        f"{where} ({config.op}) needs the torch model, but pipeline[{lost_at}] "
                        f"({prev.op}) produces ONNX only. Order the ops that train or change "
                        "layer shapes (prune channels/gradual, distill, fine_tune, low_rank, "
                        "qat) before ONNX-only ops such as quantize."
                    )
                sub = config.torch_field()
                raise PipelineError(detail, f"{where}.{sub}" if sub else where)
            backend: Backend = "torch"
        elif (
            "torch" in options and torch_available and (later_needs_torch or options[0] == "torch")
        ):
            backend = "torch"
        elif "onnx" in options:
            backend = "onnx"
        else:  # pragma: no cover - every op runs somewhere
            raise PipelineError(f"{where} ({config.op}) has no backend", where)
        plan.append(backend)
        if torch_available and (backend == "onnx" or not config.keeps_torch()):
            torch_available, lost_at = False, index
    return plan


def op_schemas() -> dict[str, dict[str, Any]]:
    """JSON schema of every op config, keyed by op name."""
    return {name: cls.model_json_schema() for name, cls in OPS.items()}


class WeightShareConfig(OpConfig):
    """Deep Compression weight sharing: per-layer k-means codebooks + Huffman coding.

    Every Conv/Gemm/MatMul weight (≥ 2-D initializer, not matched by `ignore`) gets a codebook
    of at most 2^bits centroids, fitted with k-means on its nonzero weights (zeros stay exactly
    zero: they are the pruned positions). The step's ONNX holds the shared values densely; the
    `cpz` archive beside it stores codebooks, Huffman-coded indices and Huffman-coded sparse
    positions (docs/archive-format.md). Biases of those layers are stored as `bias_bits`
    linear levels (0 keeps them float32 inside the compressed graph).
    """

    op: Literal["weight_share"] = "weight_share"
    bits: int = Field(5, ge=1, le=8, description="codebook index bits per layer")
    scope: Literal["layer"] = "layer"
    init: Literal["linear", "density", "random"] = "linear"
    iterations: int = Field(30, ge=0, le=1000, description="k-means (Lloyd) iterations")
    ignore: list[str] = Field(default_factory=list, description="layer/weight name patterns")
    huffman: bool = True
    bias_bits: int = Field(8, ge=0, le=16, description="bias levels; 0 keeps float32")

    @model_validator(mode="after")
    def _bias_bits_range(self) -> WeightShareConfig:
        if self.bias_bits == 1:
            raise ValueError("bias_bits must be 0 (keep float32) or 2..16")
        return self


class LowRankConfig(OpConfig):
    """Truncated-SVD factorization of Linear and Conv2d layers (torch model, .pt2).

    A Linear in→out becomes in→r→out; a k×k Conv2d becomes a k×k conv with r filters and a
    1×1 conv. r is `rank_ratio`·min(out, in·k·k), or the smallest rank keeping `energy` of the
    squared singular values (default energy 0.9). Layers where r·(in+out) would not be smaller
    than in·out are left as they are; the output layer is kept unless `include_last_layer`.
    """

    op: Literal["low_rank"] = "low_rank"
    rank_ratio: float | None = Field(None, gt=0.0, le=1.0)
    energy: float | None = Field(None, gt=0.0, le=1.0)
    ignore: list[str] = Field(default_factory=list, description="layer name patterns")
    include_last_layer: bool = False

    @model_validator(mode="after")
    def _one_criterion(self) -> LowRankConfig:
        if self.rank_ratio is not None and self.energy is not None:
            raise ValueError("give either rank_ratio or energy, not both")
        if self.rank_ratio is None and self.energy is None:
            object.__setattr__(self, "energy", 0.9)
        return self

    def backends(self) -> tuple[Backend, ...]:
        return ("torch",)


OPS["weight_share"] = WeightShareConfig
OPS["low_rank"] = LowRankConfig


PRESETS: dict[str, dict[str, Any]] = {
    "edge-int8": {
        "description": "Static INT8 QDQ, per-channel weights, calibrated on your dataset.",
        "pipeline": [{"op": "quantize", "mode": "static", "dtype": "int8", "per_channel": True}],
    },
    "fp16": {
        "description": "Float16 weights and activations; inputs/outputs stay float32.",
        "pipeline": [{"op": "quantize", "dtype": "fp16"}],
    },
    "int4-weights": {
        "description": (
            "Weight-only INT4 (onnxruntime MatMulNBits, blocks of 32) for MatMul/Gemm-heavy "
            "models such as transformers; activations stay float."
        ),
        "pipeline": [{"op": "quantize", "mode": "weight_only", "dtype": "int4"}],
    },
    "tiny": {
        "description": (
            "Smallest and fastest: half the channels removed in 3 rounds with training, "
            "distilled from the original, then static INT8 (.pt2 upload and a labelled or "
            "unlabelled dataset)."
        ),
        "pipeline": [
            {
                "op": "prune",
                "criterion": "magnitude",
                "granularity": "channels",
                "sparsity": 0.5,
                "schedule": {"kind": "gradual", "steps": 3, "epochs_per_step": 3},
            },
            {"op": "distill", "epochs": 10, "temperature": 4.0, "alpha": 0.5},
            {"op": "quantize", "mode": "static", "dtype": "int8", "per_channel": True},
        ],
    },
    "deep-compression": {
        "description": (
            "Deep Compression (Han et al.): 94% of the weights pruned in 6 rounds with "
            "training, 5-bit per-layer weight sharing and Huffman coding into a compact "
            "archive (storage/over-the-air size; the dense ONNX runs anywhere)."
        ),
        "pipeline": [
            {
                "op": "prune",
                "criterion": "magnitude",
                "granularity": "unstructured",
                "sparsity": 0.94,
                "scope": "global",
                "include_last_layer": True,
                "schedule": {"kind": "gradual", "steps": 6, "epochs_per_step": 10},
                "fine_tune_epochs": 20,
                "lr": 0.002,
            },
            {"op": "weight_share", "bits": 5},
        ],
    },
}


def keeps_torch_model(configs: list[OpConfig], plan: list[Backend], model_format: str) -> bool:
    """Whether the pipeline ends with a torch model (so a .pt2 can be delivered)."""
    return model_format == "pt2" and all(
        b == "torch" and c.keeps_torch() for c, b in zip(configs, plan, strict=True)
    )


def _merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def preset_pipeline(
    name: str, overrides: dict[str, dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """A preset's steps with `overrides` merged in: keys are an op name (every step with that
    op) or a step index ("0", "1", ...); values are config fields (nested dicts merge)."""
    if name not in PRESETS:
        raise KeyError(name)
    steps = [dict(step) for step in PRESETS[name]["pipeline"]]
    for key, change in (overrides or {}).items():
        if not isinstance(change, dict):
            raise PipelineError(
                f"overrides[{key!r}] must be an object of config fields", "overrides"
            )
        if key.isdigit():
            hits = [int(key)] if int(key) < len(steps) else []
        else:
            hits = [i for i, step in enumerate(steps) if step["op"] == key]
        if not hits:
            ops = ", ".join(f"{i} ({step['op']})" for i, step in enumerate(steps))
            raise PipelineError(
                f"overrides key {key!r} matches no step of preset {name!r}; its steps are {ops}.",
                f"overrides.{key}",
            )
        if "op" in change:
            raise PipelineError("overrides cannot change a step's op", f"overrides.{key}.op")
        for i in hits:
            steps[i] = _merge(steps[i], change)
    return steps
