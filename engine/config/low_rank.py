"""The low_rank op's config: truncated-SVD factorization of Linear and Conv2d layers."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from engine.config.base import Backend, OpConfig


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
