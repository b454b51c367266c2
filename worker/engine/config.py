"""Versioned, serializable op configs; torch-free, so the API validates with the same classes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class OpConfig(BaseModel):
    """Base for op configs: strict keys, a type tag (`op`) and a schema version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    op: str
    version: int = 1

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class Calibration(BaseModel):
    """How static quantization picks activation ranges."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    percentile: float = Field(99.999, gt=90, le=100)
    samples: int = Field(256, ge=1, le=100_000)


class QuantizeConfig(OpConfig):
    """Post-training quantization with onnxruntime's tools (int8/uint8 static or dynamic, fp16)."""

    op: Literal["quantize"] = "quantize"
    mode: Literal["static", "dynamic"] | None = None
    dtype: Literal["int8", "uint8", "fp16"] = "int8"
    per_channel: bool = True
    calibration: Calibration = Calibration()

    @model_validator(mode="after")
    def _mode_matches_dtype(self) -> QuantizeConfig:
        if self.dtype == "fp16" and self.mode is not None:
            raise ValueError("dtype 'fp16' takes no 'mode'; leave 'mode' out")
        if self.dtype in ("int8", "uint8") and self.mode is None:
            object.__setattr__(self, "mode", "static")
        return self


CHANNELS_NEED_PT2 = (
    "Channel pruning needs the torch graph: upload a torch.export .pt2 "
    "(torch.export.save(torch.export.export(model, args), 'model.pt2')); for ONNX use "
    "granularity 'unstructured' or 'n:m'."
)
CHANNELS_FIRST = (
    "Channel pruning rewrites the uploaded .pt2 itself, so it must be the first step of the "
    "pipeline: move the granularity 'channels' prune to pipeline[0] (later steps such as "
    "quantize then run on its result)."
)


class PruneConfig(OpConfig):
    """Zero the least important weights (unstructured, N:M) or remove whole channels.

    `channels` removes output channels/neurons of a .pt2 model for real (smaller, faster layers)
    and may fine-tune afterwards on a labelled dataset for `fine_tune_epochs` with Adam at `lr`.
    """

    op: Literal["prune"] = "prune"
    criterion: Literal["magnitude", "random"] = "magnitude"
    norm: Literal["l1", "l2"] = "l1"
    granularity: Literal["unstructured", "n:m", "channels"] = "unstructured"
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    scope: Literal["layer", "global"] = "layer"
    n: int = Field(2, ge=1, description="zeros per group of m (n:m granularity)")
    m: int = Field(4, ge=2, le=16)
    ignore: list[str] = Field(default_factory=list, description="layer/weight name patterns")
    include_last_layer: bool = False
    fine_tune_epochs: int = Field(
        0, ge=0, le=100, description="recovery epochs after channel pruning (needs labels)"
    )
    lr: float = Field(1e-3, gt=0, le=1, description="Adam learning rate for fine-tuning")

    @model_validator(mode="after")
    def _n_below_m(self) -> PruneConfig:
        if self.n >= self.m:
            raise ValueError(f"n ({self.n}) must be smaller than m ({self.m})")
        if self.fine_tune_epochs and self.granularity != "channels":
            raise ValueError("fine_tune_epochs applies to granularity 'channels' only")
        return self


OPS: dict[str, type[OpConfig]] = {"quantize": QuantizeConfig, "prune": PruneConfig}


def parse_op(data: dict[str, Any]) -> OpConfig:
    """Parse one pipeline step; raises ValueError naming the valid ops for an unknown one."""
    op = data.get("op") if isinstance(data, dict) else None
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; valid ops: {', '.join(sorted(OPS))}")
    return OPS[op].model_validate(data)


def parse_pipeline(steps: list[dict[str, Any]]) -> list[OpConfig]:
    return [parse_op(step) for step in steps]


def op_schemas() -> dict[str, dict[str, Any]]:
    """JSON schema of every op config, keyed by op name."""
    return {name: cls.model_json_schema() for name, cls in OPS.items()}


PRESETS: dict[str, dict[str, Any]] = {
    "edge-int8": {
        "description": "Static INT8 QDQ, per-channel weights, calibrated on your dataset.",
        "pipeline": [{"op": "quantize", "mode": "static", "dtype": "int8", "per_channel": True}],
    },
    "fp16": {
        "description": "Float16 weights and activations; inputs/outputs stay float32.",
        "pipeline": [{"op": "quantize", "dtype": "fp16"}],
    },
}
