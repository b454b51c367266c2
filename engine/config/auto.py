"""The `auto` op's config: a budget, an objective and search limits (`preset: "auto"`).

`POST /v1/jobs {"preset": "auto", "budget": {...}, "objective": ..., "search": {...}}` becomes
one `auto` step; the search itself is engine.search.auto.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engine.config.base import Backend, OpConfig, PipelineError

Objective = Literal["size", "latency", "balanced"]
OBJECTIVES: tuple[str, ...] = ("size", "latency", "balanced")


class Budget(BaseModel):
    """What the chosen model must meet; every key given is checked on the measured metrics."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_accuracy_drop: float | None = Field(
        None, ge=0.0, le=1.0, description="top-1 accuracy lost against the labels; 0.01 is a point"
    )
    min_cosine: float | None = Field(
        None, ge=-1.0, le=1.0, description="cosine similarity of the outputs to the original's"
    )
    min_sqnr_db: float | None = Field(
        None, ge=-100.0, le=200.0, description="SQNR of the worst output or channel slice (dB)"
    )
    max_size_bytes: int | None = Field(
        None, ge=1, description="bytes delivered (the archive where a candidate makes one)"
    )
    max_latency_ms: float | None = Field(
        None, gt=0.0, description="onnxruntime CPU latency p50, batch 1, the job's threads"
    )

    @model_validator(mode="after")
    def _at_least_one(self) -> Budget:
        if all(getattr(self, key) is None for key in BUDGET_KEYS):
            raise ValueError(f"give at least one budget key: {', '.join(BUDGET_KEYS)}")
        return self

    def given(self) -> dict[str, float]:
        return {k: float(v) for k in BUDGET_KEYS if (v := getattr(self, k)) is not None}


BUDGET_KEYS: tuple[str, ...] = (
    "max_accuracy_drop",
    "min_cosine",
    "min_sqnr_db",
    "max_size_bytes",
    "max_latency_ms",
)
FIDELITY_KEYS = ("max_accuracy_drop", "min_cosine", "min_sqnr_db")


class SearchLimits(BaseModel):
    """How long the search may run and how many candidates it may build and measure."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_minutes: float = Field(
        15.0, gt=0.0, le=720.0, description="wall-clock bound; no candidate starts after it"
    )
    max_candidates: int = Field(
        12, ge=1, le=100, description="candidates built and measured (reused ones count)"
    )


class AutoConfig(OpConfig):
    """Pareto search over the catalog for the best model within `budget` (docs/auto.md).

    Candidates (quantize modes/dtypes with their repairs, prune, low_rank, weight_share,
    distillation-backed variants and their compositions) are ordered by analytic estimates,
    skipped when dominated, built and measured one by one; the chosen one is the best on
    `objective` among those meeting the whole budget, else the original model with a warning.
    """

    op: Literal["auto"] = "auto"
    # no default: the team's constraint; the example is what a form starts from
    budget: Budget = Field(examples=[{"max_accuracy_drop": 0.01}])
    objective: Objective = "size"
    search: SearchLimits = SearchLimits()

    def backends(self) -> tuple[Backend, ...]:
        return ("onnx",)

    def fits_data(self) -> bool:
        # candidates train and refit on the dataset: measure all of them on held-out samples
        return True

    def may_train_torch(self, model_format: str) -> bool:
        # a .pt2 upload's catalog holds distillation-backed candidates (engine.search.auto)
        return model_format == "pt2"

    def needs_dataset(self) -> str | None:
        if self.budget.max_accuracy_drop is not None:
            return "budget max_accuracy_drop measures accuracy on a labelled dataset"
        return None

    def needs_labels(self) -> str | None:
        if self.budget.max_accuracy_drop is not None:
            return "budget max_accuracy_drop compares accuracy against the labels"
        return None


def auto_step(
    budget: Any, objective: Any = None, search: Any = None, *, field_prefix: str = ""
) -> dict[str, Any]:
    """The one pipeline step of `preset: "auto"`, checked; PipelineError names the request
    field at fault (`budget.<key>`, `objective`, `search.<key>`) and, for budget keys, the
    valid ones."""
    if not isinstance(budget, dict) or not budget:
        raise PipelineError(
            "invalid_budget",
            "preset 'auto' needs a 'budget' object with at least one of "
            f'{", ".join(BUDGET_KEYS)}, e.g. {{"max_accuracy_drop": 0.01}}.',
            f"{field_prefix}budget",
            valid_keys=list(BUDGET_KEYS),
        )
    unknown = [k for k in budget if k not in BUDGET_KEYS]
    if unknown:
        raise PipelineError(
            "invalid_budget",
            f"Unknown budget key {unknown[0]!r}; valid keys: {', '.join(BUDGET_KEYS)}.",
            f"{field_prefix}budget.{unknown[0]}",
            valid_keys=list(BUDGET_KEYS),
        )
    if objective is not None and objective not in OBJECTIVES:
        raise PipelineError(
            "invalid_objective",
            f"Unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)} (balanced: "
            "size ratio × latency ratio).",
            f"{field_prefix}objective",
            valid_objectives=list(OBJECTIVES),
        )
    step: dict[str, Any] = {"op": "auto", "budget": budget}
    if objective is not None:
        step["objective"] = objective
    if search is not None:
        step["search"] = search
    try:
        return AutoConfig.model_validate(step).to_dict()
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = ".".join(str(p) for p in error.get("loc", ()))
        hint = ""
        if loc.startswith("search"):
            hint = " search takes max_minutes (0 < m ≤ 720) and max_candidates (1..100)."
        raise PipelineError(
            "invalid_budget" if loc.startswith("budget") else "invalid_search",
            f"{loc or 'budget'}: {error['msg']}.{hint}",
            f"{field_prefix}{loc}" if loc else f"{field_prefix}budget",
        ) from exc
