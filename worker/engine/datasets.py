"""Datasets: .npz (no pickles) or .safetensors arrays, matched to a model's inputs."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.engine.errors import EngineError

SINGLE_INPUT_ALIASES = ("inputs", "x")
LABELS = "labels"


def load_dataset(path: str | Path) -> dict[str, np.ndarray]:
    """All arrays of the file; object arrays (pickles) are refused."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except ValueError as exc:
            raise EngineError(
                "dataset_invalid",
                f"The .npz holds an array that needs pickle ({exc}); save numeric arrays only.",
                field="dataset_id",
            ) from exc
    else:
        try:
            from safetensors.numpy import load_file

            arrays = load_file(str(path))
        except Exception as exc:
            raise EngineError(
                "dataset_invalid",
                f"The dataset is neither .npz nor .safetensors ({exc}).",
                field="dataset_id",
            ) from exc
    if not arrays:
        raise EngineError("dataset_invalid", "The dataset has no arrays.", field="dataset_id")
    counts = {name: a.shape[0] if a.ndim else None for name, a in arrays.items()}
    if None in counts.values() or len(set(counts.values())) != 1:
        raise EngineError(
            "dataset_invalid",
            f"All arrays must share the sample count as first dimension; got {counts}.",
            field="dataset_id",
        )
    return arrays


def inspect_dataset(path: str | Path) -> dict[str, Any]:
    arrays = load_dataset(path)
    return {
        "num_samples": int(next(iter(arrays.values())).shape[0]),
        "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()},
        "has_labels": LABELS in arrays,
    }


@dataclass
class Samples:
    """Model inputs by input name, optional labels, and where they came from."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str  # "dataset" | "synthetic"

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def take(self, n: int) -> Samples:
        labels = self.labels[:n] if self.labels is not None else None
        return Samples({k: v[:n] for k, v in self.inputs.items()}, labels, self.source)

    def batches(self, size: int) -> Any:
        for start in range(0, len(self), size):
            yield {k: v[start : start + size] for k, v in self.inputs.items()}


def match_inputs(arrays: dict[str, np.ndarray], specs: list[dict[str, Any]]) -> Samples:
    """The array for each model input (by name, or x/inputs for a single input), checked."""
    candidates = {k: v for k, v in arrays.items() if k != LABELS}
    inputs: dict[str, np.ndarray] = {}
    for spec in specs:
        name = spec["name"]
        array = candidates.get(name)
        if array is None and len(specs) == 1:
            alias = next((a for a in SINGLE_INPUT_ALIASES if a in candidates), None)
            if alias is None and len(candidates) == 1:
                alias = next(iter(candidates))
            array = candidates.get(alias) if alias else None
        if array is None:
            raise EngineError(
                "dataset_mismatch",
                f"Model input {name!r} has no array in the dataset (arrays: "
                f"{', '.join(sorted(candidates)) or 'none'}). Name one array per model input.",
                field="dataset_id",
            )
        want = spec["shape"]
        if want and (
            array.ndim != len(want)
            or any(
                isinstance(w, int) and w != g
                for w, g in zip(want[1:], array.shape[1:], strict=False)
            )
        ):
            raise EngineError(
                "dataset_mismatch",
                f"Array for input {name!r} has shape {list(array.shape)} but the model expects "
                f"{['N', *want[1:]]}.",
                field="dataset_id",
            )
        dtype = np.dtype(spec.get("dtype", "float32"))
        if array.dtype != dtype:
            castable = (dtype.kind == "f" and array.dtype.kind in "fiub") or (
                dtype.kind in "iu" and array.dtype.kind in "iu"
            )
            if castable:
                array = array.astype(dtype)
            else:
                raise EngineError(
                    "dataset_mismatch",
                    f"Array for input {name!r} has dtype {array.dtype}; the model expects {dtype}.",
                    field="dataset_id",
                )
        inputs[name] = np.ascontiguousarray(array)
    labels = arrays.get(LABELS)
    if labels is not None:
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
    return Samples(inputs, labels, "dataset")


def synthetic(specs: list[dict[str, Any]], n: int = 32, seed: int = 0) -> Samples:
    """Random-normal inputs from the input spec (dynamic dims → 1) when there is no dataset."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in specs:
        dims = [d if isinstance(d, int) and d > 0 else 1 for d in spec["shape"][1:]]
        dtype = np.dtype(spec.get("dtype", "float32"))
        if dtype.kind == "f":
            inputs[spec["name"]] = rng.standard_normal((n, *dims)).astype(dtype)
        else:
            inputs[spec["name"]] = rng.integers(0, 2, (n, *dims)).astype(dtype)
    return Samples(inputs, None, "synthetic")
