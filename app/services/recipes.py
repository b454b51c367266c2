"""Recipes: a job's inputs by sha256, its resolved pipeline, seed and versions; a posted recipe
turned back into a job request. The rules themselves live in engine.recipe."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.db.models import Dataset, Job, Model, ModelStatus
from app.db.repositories import TeamJobRepository, TeamRepository
from app.errors import Conflict, Invalid, NotFound, not_found
from app.schemas.jobs import JobCreate
from app.services import uploaded
from app.services.datasets import DATASETS
from app.services.models import MODELS
from engine.config import PipelineError
from engine.recipe import (
    HASH_FIELD,
    Recipe,
    RecipeEdited,
    build_recipe,
    check_recipe,
    library_versions,
    version_differences,
)

# Fields of POST /v1/jobs that a recipe already holds.
RECIPE_HOLDS = (
    "preset",
    "pipeline",
    "overrides",
    "budget",
    "objective",
    "search",
    "evaluation",
    "export",
    "seed",
)


def materials(model: Model, dataset: Dataset | None) -> dict[str, Any]:
    """What a job is made from, by content: kept on the job so its recipe outlives the uploads."""
    return {
        "model": {"sha256": model.sha256, "format": model.format},
        "dataset": {"sha256": dataset.sha256, "format": dataset.format} if dataset else None,
    }


def _materials_of(session: Session, job: Job) -> dict[str, Any]:
    if job.materials:
        return job.materials
    # a job made before materials were recorded: its uploads, while they exist
    model = TeamRepository(session, Model, job.team_id).get(job.model_id or "")
    if model is None:
        raise Conflict(
            "recipe_unavailable",
            "The job's model was deleted before its sha256 was recorded, so its recipe cannot "
            "name it. Recipes of jobs created since then always can.",
        )
    dataset = TeamRepository(session, Dataset, job.team_id).get(job.dataset_id or "")
    return materials(model, dataset)


def recipe_of(session: Session, job: Job) -> dict[str, Any]:
    """The job's recipe, its content hash included."""
    inputs = _materials_of(session, job)
    try:
        return build_recipe(
            model=inputs["model"],
            dataset=inputs["dataset"],
            pipeline=[step.config for step in job.steps],
            evaluation=job.evaluation,
            export=job.export,
            seed=job.seed,
            versions=job.versions,
        )
    except PipelineError as exc:  # a step stored by an older config schema
        raise Conflict(
            "recipe_unavailable",
            f"The job's pipeline no longer parses with this service's op configs: {exc.detail}",
        ) from exc


def read_recipe(session: Session, team_id: str, job_id: str) -> dict[str, Any]:
    job = TeamJobRepository(session, team_id).get_with_steps(job_id)
    if job is None:
        raise not_found("job", job_id)
    return recipe_of(session, job)


def version_warnings(job: Job) -> list[str]:
    """A warning when the job was made from a recipe that ran with other versions: those of
    the worker that ran it, or before one did, the API's own."""
    if not job.recipe_versions:
        return []
    running = job.versions or library_versions()
    changed = version_differences(job.recipe_versions, running)
    if not changed:
        return []
    return [
        "This job was made from a recipe that ran with other versions ("
        + ", ".join(changed)
        + "); metrics and artifact bytes may differ from the recipe's job."
    ]


def _only_recipe(body: JobCreate) -> None:
    given = [name for name in RECIPE_HOLDS if name in body.model_fields_set]
    if given:
        raise Invalid(
            "validation_error",
            f"With 'recipe', the pipeline, evaluation, export and seed come from the recipe; "
            f"remove {', '.join(map(repr, given))}. To run something different, send it as a "
            "normal job ('pipeline', 'evaluation', 'export', 'seed') without 'recipe'.",
            field=given[0],
        )


def _check_hash(recipe: Recipe) -> None:
    try:
        check_recipe(recipe.model_dump(mode="json"))
    except RecipeEdited as exc:
        raise Invalid(
            "recipe_edited",
            f"The recipe's {HASH_FIELD} ({exc.given}) does not match its content, which hashes "
            f"to {exc.actual}: the recipe was changed after GET /v1/jobs/{{id}}/recipe made it. "
            "Send it unchanged to run that job again; to change a step, the evaluation or the "
            "seed, send them as a normal job ('pipeline', 'evaluation', 'export', 'seed') "
            "instead of 'recipe'.",
            field=f"recipe.{HASH_FIELD}",
        ) from exc


def _find(
    session: Session, team_id: str, kind: type[Model] | type[Dataset], sha256: str, name: str
) -> Any:
    """The team's upload with this content (a ready model first); 404 like an unknown id."""
    repo = TeamRepository(session, kind, team_id)
    row = (
        repo.latest_by(sha256=sha256, status=ModelStatus.ready) if kind is Model else None
    ) or repo.latest_by(sha256=sha256)
    if row is None:
        raise NotFound(
            f"recipe_{name}_not_found",
            f"Your team has no {name} with sha256 {sha256} (the recipe's {name}). Upload that "
            f"file with POST /v1/{name}s (wait until a model is 'ready'), then send the recipe "
            f"again, or give its id as {name}_id.",
            field=f"recipe.{name}.sha256",
        )
    return row


def _given(
    session: Session, team_id: str, name: str, object_id: str, sha256: str
) -> Model | Dataset:
    row: Model | Dataset = (
        uploaded.get_or_raise(session, MODELS, team_id, object_id)
        if name == "model"
        else uploaded.get_or_raise(session, DATASETS, team_id, object_id)
    )
    if row.sha256 != sha256:
        raise Invalid(
            f"recipe_{name}_mismatch",
            f"{name}_id {object_id!r} has sha256 {row.sha256}; the recipe's {name} has "
            f"{sha256}. Give the {name} the recipe was made with, or leave {name}_id out to "
            "have it found by its sha256.",
            field=f"{name}_id",
        )
    return row


def job_request(
    session: Session, team_id: str, body: JobCreate
) -> tuple[JobCreate, dict[str, Any] | None]:
    """The normal job request a recipe stands for, and the versions the recipe ran with.

    The inputs are looked up first (404 when the team has no such upload, as for an unknown
    id), then the request and the recipe's hash are checked (422).
    """
    recipe = body.recipe
    assert recipe is not None
    model_sha = recipe.model.sha256
    model = (
        _given(session, team_id, "model", body.model_id, model_sha)
        if body.model_id is not None
        else _find(session, team_id, Model, model_sha, "model")
    )
    dataset = None
    if recipe.dataset is not None:
        dataset = (
            _given(session, team_id, "dataset", body.dataset_id, recipe.dataset.sha256)
            if body.dataset_id is not None
            else _find(session, team_id, Dataset, recipe.dataset.sha256, "dataset")
        )
    elif body.dataset_id is not None:
        raise Invalid(
            "validation_error",
            "The recipe's job ran without a dataset; remove dataset_id (or run a normal job "
            "with it).",
            field="dataset_id",
        )
    _only_recipe(body)
    _check_hash(recipe)
    try:
        request = JobCreate.model_validate(
            {
                "model_id": model.id,
                "dataset_id": dataset.id if dataset else None,
                "pipeline": recipe.pipeline,
                "evaluation": recipe.evaluation,
                "export": recipe.export,
                "seed": recipe.seed,
            }
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise Invalid(
            "invalid_recipe",
            f"The recipe is not one GET /v1/jobs/{{id}}/recipe makes: recipe.{where}: "
            f"{first['msg']}.",
            field=f"recipe.{where}",
        ) from exc
    return request, recipe.versions
