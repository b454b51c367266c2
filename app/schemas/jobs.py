from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from app.schemas.common import ErrorInfo, ReadModel
from engine.quality import DEFAULT_FLOORS
from engine.recipe import Recipe

VerdictName = Literal["ok", "degraded", "rejected"]


class Evaluation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: Literal["classification", "embedding", "generic"] = "classification"
    holdout: float | None = Field(
        None,
        ge=0.0,
        le=0.9,
        description=(
            "Fraction of the dataset held out of training/calibration and used for every "
            "measurement. Default: 0.3 when a step fits weights to the data (fine_tune, distill, "
            "qat, prune with training, prune channels with reconstruct or scope measured), "
            "else 0 (all samples are measured)."
        ),
    )
    floor: dict[str, float | None] | None = Field(
        None,
        description=(
            "The quality floor the final result is held to, by metric name, overriding the "
            f"task's default ({DEFAULT_FLOORS}); null turns a default check off. Keys: "
            "agreement_top1, accuracy_drop (at most), cosine_similarity, sqnr_db, sqnr_db_min. "
            "A job whose final result is under it fails with quality_below_floor."
        ),
    )
    allow_below_floor: bool = Field(
        False,
        description="Accept a final result under the floor: the job succeeds with verdict "
        "'degraded' and a warning instead of failing with quality_below_floor.",
    )


SEED_MAX = 2**31 - 1


class JobCreate(BaseModel):
    """A compression request: a preset, an explicit pipeline of ops, or a recipe to run again."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"anyOf": [{"required": ["model_id"]}, {"required": ["recipe"]}]},
    )

    model_id: str | SkipJsonSchema[None] = Field(
        default=None,
        description="Required, except with 'recipe' (then the team's model with the recipe's "
        "sha256 is used when it is not given).",
    )
    dataset_id: str | None = None
    preset: str | None = None
    pipeline: list[dict[str, Any]] | None = Field(
        default=None,
        description='Ordered ops, e.g. [{"op": "quantize", "mode": "static", "dtype": '
        '"int8"}]. GET /v1/methods lists every op with its JSON schema.',
    )
    overrides: dict[str, dict[str, Any]] | None = Field(
        default=None,
        description="With a preset: config fields to change, by op name or step index, e.g. "
        '{"prune": {"sparsity": 0.6}, "2": {"per_channel": false}}.',
    )
    budget: dict[str, Any] | None = Field(
        default=None,
        description='With preset "auto": what the chosen model must meet, any of '
        "max_accuracy_drop, min_cosine, min_sqnr_db (worst slice), max_size_bytes, "
        'max_latency_ms, e.g. {"max_accuracy_drop": 0.01} (docs/auto.md).',
    )
    objective: str | None = Field(
        default=None,
        description='With preset "auto": what the search minimises within the budget: '
        "size (default), latency, or balanced (size ratio × latency ratio).",
    )
    search: dict[str, Any] | None = Field(
        default=None,
        description='With preset "auto": limits, {"max_minutes": 15, "max_candidates": 12} '
        "by default.",
    )
    evaluation: Evaluation = Evaluation()
    export: list[Literal["onnx", "pt2"]] = Field(
        default=["onnx"],
        description="'pt2' is available when every step keeps a torch model (a .pt2 upload "
        "and no ONNX-only op such as quantize).",
    )
    seed: int = Field(
        default=0,
        ge=0,
        le=SEED_MAX,
        description="Seeds the held-out split, sample subsets and training: the same seed on "
        "the same inputs gives the same result.",
    )
    recipe: Recipe | SkipJsonSchema[None] = Field(
        default=None,
        description="A recipe from GET /v1/jobs/{id}/recipe, unchanged: runs that job again "
        "(its pipeline, evaluation, export and seed) on the team's model and dataset with "
        "the recipe's sha256. Alone, or with model_id/dataset_id.",
    )


class ArtifactRead(ReadModel):
    id: str
    job_id: str
    step_index: int | None
    role: Literal["checkpoint", "final"]
    format: str
    size_bytes: int
    sha256: str
    verdict: VerdictName | None = Field(
        None,
        description="The quality verdict of the model in the file; 'rejected' files are under "
        "the floor (kept for inspection, not to ship). Null for files from before verdicts.",
    )
    created_at: datetime


class JobStepRead(ReadModel):
    index: int
    op: str
    config: dict[str, Any]
    status: str
    metrics: dict[str, Any] | None
    quality: dict[str, Any] | None = None
    warnings: list[str] | None
    details: dict[str, Any] | None = None
    artifact_id: str | None
    started_at: datetime | None
    finished_at: datetime | None


class JobRead(BaseModel):
    id: str
    model_id: str | None
    dataset_id: str | None
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    progress: float
    current_step: int | None
    preset: str | None
    evaluation: dict[str, Any]
    export: list[str]
    seed: int
    steps: list[JobStepRead]
    metrics: dict[str, Any] | None
    quality: dict[str, Any] | None = Field(
        None,
        description="The final result's verdict against the floor: {verdict, measured, floor, "
        "below_floor} (docs/metrics.md).",
    )
    artifacts: list[ArtifactRead]
    warnings: list[str]
    error: ErrorInfo | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobStatusRead(BaseModel):
    """GET /v1/jobs/{id}?view=status: what a poller needs, read from one row."""

    id: str
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    progress: float
    current_step: int | None
    updated_at: datetime = Field(description="When the job row last changed.")
