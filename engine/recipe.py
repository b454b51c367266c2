"""A job's recipe: everything needed to run it again, with its own content hash.

The recipe names the model and dataset by sha256, holds the pipeline with every default filled
in, the evaluation, the export, the seed and the versions of the engine and libraries that ran
it. `content_sha256` is the sha256 of the canonical JSON of everything else, so an edited
recipe is told apart from the one the service gave. Torch-free: the API builds and checks it.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.config import parse_steps, resolve_holdout

RECIPE_VERSION = 1
HASH_FIELD = "content_sha256"
# The distributions whose versions can change a job's result, by their package names.
LIBRARIES = ("compaas", "torch", "onnxruntime", "onnx", "torch-pruning", "numpy")


def _normalized(value: Any) -> Any:
    """Integral floats as ints, so 1.0 and 1 (a JSON round trip through another language) hash
    alike."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {str(k): _normalized(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalized(v) for v in value]
    return value


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8, integral floats as ints: the bytes the hash covers."""
    text = json.dumps(_normalized(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode()


def content_hash(recipe: Mapping[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of the recipe without its own hash field."""
    return hashlib.sha256(
        canonical_json({k: v for k, v in recipe.items() if k != HASH_FIELD})
    ).hexdigest()


def library_versions() -> dict[str, str | None]:
    """This process's versions of the engine, Python and the libraries (None: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def version_differences(
    recipe: Mapping[str, str | None] | None, running: Mapping[str, str | None] | None
) -> list[str]:
    """`name a → b` for each package whose version differs (unknown on either side: skipped)."""
    if not recipe or not running:
        return []
    return [
        f"{name} {recipe[name]} → {running[name]}"
        for name in sorted(recipe)
        if recipe.get(name) and running.get(name) and recipe[name] != running[name]
    ]


class Material(BaseModel):
    """An input file, named by its content."""

    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    format: str | None = None


class Recipe(BaseModel):
    """The parsed form of a recipe a client sends back (after its hash was checked)."""

    model_config = ConfigDict(extra="forbid")

    recipe_version: Literal[1]
    model: Material
    dataset: Material | None
    pipeline: list[dict[str, Any]]
    # the job's evaluation settings as the API stores them (it checks them when they come back)
    evaluation: dict[str, Any]
    export: list[str]
    seed: int = Field(ge=0, le=2**31 - 1)
    versions: dict[str, str | None] | None
    content_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class RecipeEdited(ValueError):
    """The recipe's content does not hash to its `content_sha256`."""

    def __init__(self, given: object, actual: str) -> None:
        super().__init__(f"content_sha256 is {given!r}; the content hashes to {actual}")
        self.given = given
        self.actual = actual


def build_recipe(
    *,
    model: Mapping[str, Any],
    dataset: Mapping[str, Any] | None,
    pipeline: Sequence[Mapping[str, Any]],
    evaluation: Mapping[str, Any],
    export: Sequence[str],
    seed: int,
    versions: Mapping[str, str | None] | None,
) -> dict[str, Any]:
    """The recipe of a job (model/dataset: `{sha256, format}`), its content hash included."""
    configs = parse_steps(list(pipeline))
    holdout = resolve_holdout(evaluation.get("holdout"), configs, has_dataset=dataset is not None)
    recipe: dict[str, Any] = {
        "recipe_version": RECIPE_VERSION,
        "model": {"sha256": model["sha256"], "format": model.get("format")},
        "dataset": (
            {"sha256": dataset["sha256"], "format": dataset.get("format")} if dataset else None
        ),
        "pipeline": [config.to_dict() for config in configs],
        "evaluation": {
            **evaluation,
            "task": evaluation.get("task", "classification"),
            "holdout": holdout,
        },
        "export": list(export),
        "seed": seed,
        "versions": dict(versions) if versions is not None else None,
    }
    recipe[HASH_FIELD] = content_hash(recipe)
    return recipe


def check_recipe(data: Mapping[str, Any]) -> Recipe:
    """The recipe, parsed; RecipeEdited when its content does not match its hash (checked
    first, so an edit is named as such), pydantic's ValidationError for a malformed one."""
    actual = content_hash(data)
    if data.get(HASH_FIELD) != actual:
        raise RecipeEdited(data.get(HASH_FIELD), actual)
    return Recipe.model_validate(dict(data))
