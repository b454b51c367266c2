"""The low_rank op's config: truncated-SVD factorization of Linear and Conv2d layers."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from engine.config.base import Backend, OpConfig
from engine.config.quantize import QuantizeTarget

# The floor the measured mode keeps when given neither `target` nor `max_params_ratio`: the
# same cosine the quantizer's `prefer: speed` defaults to.
DEFAULT_LOW_RANK_TARGET = QuantizeTarget(min_cosine=0.99)
DEFAULT_MIN_SAVING = 0.2


class LowRankConfig(OpConfig):
    """Truncated-SVD factorization of Linear and Conv2d layers (torch model, .pt2).

    A Linear in→out becomes in→r→out; a k×k Conv2d becomes a k×k conv with r filters and a
    1×1 conv. A layer is factorized only where r·(out + in·k·k) saves at least `min_saving` of
    its parameters (unset: 0.2 in the measured mode; any saving with energy or rank_ratio).

    * measured (the default: neither `energy` nor `rank_ratio`): each layer's rank options are
      measured one layer at a time on `samples` of the job's samples against the step's input;
      ranks are chosen greedily by fidelity lost per parameter saved until `target` (default
      min_cosine 0.99) or `max_params_ratio` is reached, the combination is measured once and
      backed off (ranks raised, layers dropped) while it misses the target.
    * `energy`: the smallest rank keeping that share of Σσ² in every layer; `rank_ratio`:
      r = ratio·min(out, in·k·k). Neither looks at the model's outputs.

    The output layer is kept unless `include_last_layer`.
    """

    op: Literal["low_rank"] = "low_rank"
    rank_ratio: float | None = Field(None, gt=0.0, le=1.0)
    energy: float | None = Field(None, gt=0.0, le=1.0)
    target: QuantizeTarget | None = Field(
        None,
        description="measured mode: the fidelity floor against the step's input (min_cosine, "
        "min_sqnr_db, or max_accuracy_drop with labels); default min_cosine 0.99 unless "
        "max_params_ratio is given",
    )
    max_params_ratio: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="measured mode: factorize until the model has at most this share of its "
        "parameters (with a target too, the target wins)",
    )
    min_saving: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="factorize a layer only at ranks saving at least this share of its "
        "parameters; unset: 0.2 when measured, any saving at all with energy or rank_ratio "
        "(as before they had this field)",
    )
    samples: int = Field(
        64, ge=4, le=4096, description="measured mode: samples each rank option is scored on"
    )
    ignore: list[str] = Field(default_factory=list, description="layer name patterns")
    include_last_layer: bool = False

    @model_validator(mode="after")
    def _one_criterion(self) -> LowRankConfig:
        if self.rank_ratio is not None and self.energy is not None:
            raise ValueError("give either rank_ratio or energy, not both")
        if not self.measured and (self.target is not None or self.max_params_ratio is not None):
            raise ValueError(
                "target and max_params_ratio choose ranks by measurement; leave out "
                "energy and rank_ratio to use them"
            )
        return self

    @property
    def measured(self) -> bool:
        """Ranks chosen by measured fidelity (neither `energy` nor `rank_ratio` given)."""
        return self.rank_ratio is None and self.energy is None

    def saving(self) -> float:
        """The share of a layer's parameters a factorization must save (`min_saving`)."""
        if self.min_saving is not None:
            return self.min_saving
        return DEFAULT_MIN_SAVING if self.measured else 0.0

    def goal(self) -> QuantizeTarget | None:
        """The fidelity floor of the measured mode (None: a parameter budget alone)."""
        if self.target is not None or self.max_params_ratio is not None:
            return self.target
        return DEFAULT_LOW_RANK_TARGET

    def needs_labels(self) -> str | None:
        if self.target is not None and self.target.max_accuracy_drop is not None:
            return "target max_accuracy_drop compares accuracy against the labels"
        return None

    def backends(self) -> tuple[Backend, ...]:
        return ("torch",)
