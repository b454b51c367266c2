"""The prune op's config: criterion, granularity, sparsity and schedule."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.config.base import Backend, OpConfig, training_lr

# `scope: measured` (engine.ops.prune.allocate) cuts each block alone to the keep counts of
# measured_probe_counts and measures the output error on MEASURED_PROBE_SAMPLES job samples; the
# pre-flight estimate (engine.torchgraph.estimate) counts the same probes.
MEASURED_PROBE_SAMPLES = 64
MEASURED_MAX_CUT = 0.8  # the most of a block's units a probe removes
MEASURED_LEVELS = 8  # keep counts probed per FFN block (every count for attention heads)


def measured_probe_counts(kind: str, units: int, round_to: int | None) -> list[int]:
    """Keep counts probed for a block of `units` heads (kind "attention": every count) or FFN
    channels (every 1/16 of the width, in multiples of round_to), from all units down to
    (1 − MEASURED_MAX_CUT) of them."""
    least = max(1, math.ceil(units * (1 - MEASURED_MAX_CUT)))
    if kind == "attention":
        return list(range(units, least - 1, -1))
    step = max(1, units // (MEASURED_LEVELS * 2))
    if round_to:
        step = max(round_to, step // round_to * round_to)
    return sorted({units, *range(units - step, least - 1, -step)}, reverse=True)


class Schedule(BaseModel):
    """One-shot pruning, or `steps` rounds to the target sparsity with training in between."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["one_shot", "gradual"] = "one_shot"
    steps: int = Field(4, ge=1, le=50, description="rounds (gradual)")
    epochs_per_step: int = Field(1, ge=0, le=50, description="training epochs after each round")


class PruneConfig(OpConfig):
    """Zero the least important weights (unstructured, N:M) or remove whole channels.

    Criteria: `auto` (default: `activation` for a transformer's heads and FFN channels when the
    job has a dataset, `magnitude` otherwise), `magnitude` (L1/L2 norm of the weights),
    `gradient` (first-order Taylor,
    |w·∂L/∂w| accumulated over the dataset; task loss with labels, KL to the original's
    outputs without), `entropy` (of each output channel's activation distribution over the
    dataset; unstructured/N:M spread a channel's score over its weights by magnitude),
    `activation` (what a weight or channel adds to its layer's output on the dataset: |w|·RMS(x)
    per weight as Wanda, E[x²]·‖w‖² per channel, the exact energy of a head's output) and
    `random` (baseline). A `gradual` schedule prunes in `steps` rounds with a cubic ramp and
    trains `epochs_per_step` epochs after each (labels → cross-entropy, no labels →
    distillation from the original); `fine_tune_epochs` trains once more at the end.
    `channels` on a transformer encoder removes attention heads and FFN channels (the residual
    width stays); `head_sparsity` sets the heads' fraction apart from `sparsity`.
    """

    op: Literal["prune"] = "prune"
    criterion: Literal["auto", "magnitude", "gradient", "entropy", "activation", "random"] = Field(
        "auto",
        description=(
            "auto: activation for the heads and FFN channels of a transformer when the job has "
            "a dataset, magnitude otherwise"
        ),
    )
    norm: Literal["l1", "l2"] = "l1"
    granularity: Literal["unstructured", "n:m", "channels"] = "unstructured"
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    head_sparsity: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description=(
            "channels on a transformer: fraction of each attention layer's heads removed "
            "(null: `sparsity`; 0 keeps every head and prunes only the FFN channels)"
        ),
    )
    reconstruct: bool | None = Field(
        None,
        description=(
            "channels on a transformer: refit each attention output / FFN down projection by "
            "least squares on the dataset so the kept heads and channels reproduce its output "
            "before the removal (null: on when the job has a dataset)"
        ),
    )
    scope: Literal["auto", "layer", "global", "measured"] = Field(
        "auto",
        description=(
            "layer: the same fraction of every layer; global: units ranked across layers by "
            "their score relative to their layer's mean; measured (channels on a transformer, "
            "with a dataset): each block is cut alone at several widths, the model's output "
            "error is measured, and the heads and FFN channels each block keeps are chosen to "
            "remove as many weights as the per-layer fractions would with the least error; "
            "auto: measured for channels on a transformer when the job has a dataset, else layer"
        ),
    )
    schedule: Schedule = Schedule()
    n: int = Field(2, ge=1, description="zeros per group of m (n:m granularity)")
    m: int = Field(4, ge=2, le=16)
    ignore: list[str] = Field(default_factory=list, description="layer/weight name patterns")
    include_last_layer: bool = False
    fine_tune_epochs: int = Field(0, ge=0, le=100, description="recovery epochs at the end")
    lr: float | None = training_lr()
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
    def _fields_agree(self) -> PruneConfig:
        if self.n >= self.m:
            raise ValueError(f"n ({self.n}) must be smaller than m ({self.m})")
        if self.granularity == "n:m" and self.schedule.kind == "gradual":
            raise ValueError("an n:m pattern is reached in one step: use schedule one_shot")
        if self.head_sparsity is not None and self.granularity != "channels":
            raise ValueError(
                "head_sparsity removes attention heads, which only granularity 'channels' "
                f"does; use granularity 'channels' or drop head_sparsity (got {self.granularity!r})"
            )
        if self.scope == "measured" and self.granularity != "channels":
            raise ValueError(
                "scope 'measured' allocates attention heads and FFN channels per block, which "
                f"only granularity 'channels' removes; use scope 'layer' or 'global' with "
                f"granularity {self.granularity!r}"
            )
        return self

    def resolved(self, transformer: bool, dataset: bool) -> PruneConfig:
        """This config with `auto` criterion and scope replaced by what they stand for."""
        update: dict[str, str] = {}
        if self.criterion == "auto":
            update["criterion"] = "activation" if transformer and dataset else "magnitude"
        if self.scope == "auto":
            heads = transformer and dataset and self.granularity == "channels"
            update["scope"] = "measured" if heads else "layer"
        return self.model_copy(update=update) if update else self

    def rounds(self) -> tuple[int, int]:
        """(rounds of cutting, training epochs after each): `steps` and `epochs_per_step` for a
        gradual schedule, one round without training for one-shot."""
        if self.schedule.kind == "gradual":
            return self.schedule.steps, self.schedule.epochs_per_step
        return 1, 0

    def reconstructs(self, dataset: bool) -> bool:
        """`reconstruct` as given, else on when the job has a dataset (not synthetic samples)."""
        return self.reconstruct if self.reconstruct is not None else dataset

    def kept_multiple(self) -> int | None:
        """`round_to` when it asks for rounding (above 1), else None."""
        return self.round_to if self.round_to and self.round_to > 1 else None

    def trains(self) -> bool:
        gradual = self.schedule.kind == "gradual" and self.schedule.epochs_per_step > 0
        return gradual or self.fine_tune_epochs > 0

    def fits_data(self) -> bool:
        """Training, or channels on a transformer refitted on the data (`reconstruct`, unless
        it is off) and allocated by measuring on it (`scope: measured`)."""
        refits = self.granularity == "channels" and self.reconstruct is not False
        return self.trains() or refits or self.scope == "measured"

    def backends(self) -> tuple[Backend, ...]:
        torch_only = (
            self.granularity == "channels"
            or self.criterion in ("gradient", "entropy", "activation")
            or self.schedule.kind == "gradual"
            or self.fine_tune_epochs > 0
        )
        return ("torch",) if torch_only else ("onnx", "torch")

    def torch_field(self) -> str | None:
        if self.granularity == "channels":
            return "granularity"
        if self.criterion in ("gradient", "entropy", "activation"):
            return "criterion"
        if self.schedule.kind == "gradual":
            return "schedule"
        return "fine_tune_epochs" if self.fine_tune_epochs else None

    def needs_dataset(self) -> str | None:
        if self.scope == "measured":
            return "scope measured measures each block's output error on the dataset's samples"
        if self.criterion in ("gradient", "entropy", "activation"):
            return f"the {self.criterion} criterion scores weights on the dataset's samples"
        if self.reconstruct:
            return "reconstruct refits the pruned layers on the dataset's samples"
        if self.trains():
            return "pruning with training (gradual schedule or fine_tune_epochs) trains on it"
        return None
