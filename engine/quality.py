"""The quality verdict: a result's fidelity figures held against a floor (docs/metrics.md).

`verdict(metrics, original, task, floor, allow_below_floor)` turns one metrics block into
`{"verdict": "ok" | "degraded" | "rejected", "measured": {...}, "floor": {...},
"below_floor": [...]}`. Every step and the final result get one; the floor decides the job's
outcome only on the final result (a middle step may dip, e.g. before a distill step recovers).

Pure: no model, no runtime; the floors are metric names of docs/metrics.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

Verdict = Literal["ok", "degraded", "rejected"]

# floor key -> (which way it is held: "min" is a lower bound, "max" an upper one; what it is)
FLOOR_KEYS: dict[str, tuple[Literal["min", "max"], str]] = {
    "agreement_top1": ("min", "top-1 agreement with the original"),
    "accuracy_drop": ("max", "accuracy drop"),  # original minus result; 0.01 is one point
    "cosine_similarity": ("min", "cosine similarity to the original"),
    "sqnr_db": ("min", "SQNR"),
    "sqnr_db_min": ("min", "SQNR of the worst output or channel slice"),
}
# Fractions in [0, 1]; the SQNR floors are any finite number of dB.
_FRACTIONS = {"agreement_top1", "accuracy_drop", "cosine_similarity"}

DEFAULT_FLOORS: dict[str, dict[str, float]] = {
    "classification": {"agreement_top1": 0.97, "accuracy_drop": 0.02},
    "embedding": {"cosine_similarity": 0.98},
    "generic": {"sqnr_db": 20.0, "sqnr_db_min": 20.0},
}

Floor = dict[str, float | None]


class FloorError(ValueError):
    """A floor key that is unknown or has an impossible value; `key` is the one at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def check_floor(floor: Mapping[str, Any] | None) -> Floor:
    """A request's `evaluation.floor`, checked: known keys, numbers (null turns a default
    check off). FloorError names the key at fault and lists the valid ones."""
    out: Floor = {}
    for key, value in (floor or {}).items():
        if key not in FLOOR_KEYS:
            raise FloorError(
                key,
                f"Unknown floor key {key!r}; valid keys: {', '.join(sorted(FLOOR_KEYS))} "
                "(metric names of docs/metrics.md).",
            )
        if value is None:
            out[key] = None
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise FloorError(key, f"Floor {key!r} must be a finite number or null, not {value!r}.")
        if key in _FRACTIONS and not 0.0 <= value <= 1.0:
            raise FloorError(
                key, f"Floor {key!r} is a fraction in [0, 1] (got {value}); 0.01 is one point."
            )
        out[key] = float(value)
    return out


def floors_for(
    task: str, metrics: Mapping[str, Any], override: Mapping[str, float | None] | None = None
) -> dict[str, float]:
    """The floor a result of `task` is held to: the task's default, where a classification
    model's output is not class scores (no top-1 agreement measured) the generic one, then the
    request's own keys (null removes a default)."""
    if task == "classification" and "agreement_top1" not in metrics and "sqnr_db" in metrics:
        base = dict(DEFAULT_FLOORS["generic"])
    else:
        base = dict(DEFAULT_FLOORS.get(task, DEFAULT_FLOORS["generic"]))
    for key, value in (override or {}).items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = value
    return base


def _measured(
    key: str, metrics: Mapping[str, Any], original: Mapping[str, Any]
) -> tuple[bool, Any]:
    """(present, value) of a floor key in a metrics block; accuracy_drop against the original."""
    if key == "accuracy_drop":
        if "accuracy_top1" in metrics and "accuracy_top1" in original:
            return True, round(float(original["accuracy_top1"]) - metrics["accuracy_top1"], 6)
        return False, None
    if key in metrics:
        return True, metrics[key]
    return False, None


def _meets(key: str, value: float | None, floor: float) -> bool:
    if value is None:  # an SQNR of null: the outputs equal the original's exactly
        return True
    return value <= floor if FLOOR_KEYS[key][0] == "max" else value >= floor


def verdict(
    metrics: Mapping[str, Any],
    original: Mapping[str, Any],
    task: str,
    floor: Mapping[str, float | None] | None = None,
    allow_below_floor: bool = False,
) -> dict[str, Any]:
    """The quality of one metrics block against its floor.

    `measured` holds the floor keys the block has (a key it lacks, e.g. accuracy_drop without
    labels, is not judged), `below_floor` the keys that miss. The verdict is `ok` when none
    misses, else `rejected`, or `degraded` when the request allows results below the floor.
    """
    floors = floors_for(task, metrics, floor)
    measured: dict[str, Any] = {}
    below: list[str] = []
    for key, bound in floors.items():
        present, value = _measured(key, metrics, original)
        if not present:
            continue
        measured[key] = value
        if not _meets(key, value, bound):
            below.append(key)
    if "sqnr_db_min" in measured and metrics.get("sqnr_db_min_slice"):
        measured["sqnr_db_min_slice"] = metrics["sqnr_db_min_slice"]
    result: Verdict = "ok" if not below else ("degraded" if allow_below_floor else "rejected")
    return {"verdict": result, "measured": measured, "floor": floors, "below_floor": below}


def shortfall(quality: Mapping[str, Any]) -> str:
    """The figures under the floor, in words: `top-1 agreement with the original 0.41 (floor:
    agreement_top1 ≥ 0.97)`; empty when none is."""
    parts = []
    measured, floors = quality["measured"], quality["floor"]
    for key in quality["below_floor"]:
        way, name = FLOOR_KEYS[key]
        where = ""
        if key == "sqnr_db_min" and measured.get("sqnr_db_min_slice"):
            where = f" at {measured['sqnr_db_min_slice']}"
        sign = "≤" if way == "max" else "≥"
        unit = " dB" if key.startswith("sqnr") else ""
        parts.append(
            f"{name} {measured[key]:g}{unit}{where} (floor: {key} {sign} {floors[key]:g}{unit})"
        )
    return "; ".join(parts)


HOW_TO_PROCEED = (
    "Make the pipeline gentler (lower sparsity, more bits, per-channel or a quantize target), "
    "add a distill or fine_tune step to recover, or, to accept it, lower evaluation.floor or "
    "set evaluation.allow_below_floor to true."
)


def rejected_detail(quality: Mapping[str, Any]) -> str:
    """The error detail of a job whose final result is under the floor."""
    return (
        f"The final result is under the quality floor: {shortfall(quality)}. Its metrics and "
        f"artifacts are kept, marked rejected. {HOW_TO_PROCEED}"
    )


def degraded_warning(quality: Mapping[str, Any]) -> str:
    """The job warning of a result accepted under the floor (evaluation.allow_below_floor)."""
    return (
        f"The final result is under the quality floor and was accepted because "
        f"evaluation.allow_below_floor is true (verdict degraded): {shortfall(quality)}."
    )


def step_warning(quality: Mapping[str, Any]) -> str:
    """A step's warning when its output is under the floor (only the final result counts)."""
    return (
        f"This step's output is under the quality floor: {shortfall(quality)}. The floor "
        "applies to the final result; a later step (distill, fine_tune) may recover."
    )


def step_warnings(steps: Iterable[tuple[int, str, Sequence[str] | None]]) -> list[str]:
    """The steps' warnings, (index, op, warnings) each, for the job's list: labelled with
    their step, a text several steps gave listed once with all of them."""
    where: dict[str, list[str]] = {}
    for index, op, warnings in steps:
        for text in warnings or ():
            label = f"{index} ({op})"
            if label not in where.setdefault(str(text), []):
                where[str(text)].append(label)
    return [
        f"{'step' if len(labels) == 1 else 'steps'} {', '.join(labels)}: {text}"
        for text, labels in where.items()
    ]
