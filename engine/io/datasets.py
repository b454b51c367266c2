"""Datasets: .npz (no pickles) or .safetensors arrays, checked and matched to a model's inputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from engine.errors import EngineError
from engine.io.arrayheaders import read_headers
from engine.io.formats import TensorSpec
from engine.io.safezip import ZipLimits

LABELS = "labels"
SINGLE_INPUT_ALIASES = ("inputs", "x")
SYNTHETIC_SAMPLES = 32
DATASET_ZIP_LIMITS = ZipLimits()


def _invalid(detail: str) -> EngineError:
    return EngineError("dataset_invalid", detail, field="dataset_id")


def load_dataset(path: str | Path) -> dict[str, np.ndarray]:
    """All arrays of the file (no pickles), checked to share their first dim (the samples).

    Headers are validated in full first (zip bounds, shapes and dtypes that match the bytes),
    so nothing larger than the file declares is ever unpacked.
    """
    path = Path(path)
    fmt, headers = read_headers(path, DATASET_ZIP_LIMITS, field="dataset_id")
    arrays = _load_npz(path) if fmt == "npz" else _load_safetensors(path)
    if set(arrays) != set(headers):
        raise _invalid("The dataset's arrays do not match its header; save the file again.")
    _check_arrays(arrays)
    return arrays


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except ValueError as exc:
        raise _invalid(
            f"The .npz holds an array that needs pickle to load ({exc}). Save numeric arrays "
            "only (no object arrays)."
        ) from exc
    except Exception as exc:
        raise _invalid(f"The .npz archive could not be read ({type(exc).__name__}: {exc}).") from (
            exc
        )


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except Exception as exc:
        raise _invalid(
            f"The .safetensors file could not be read ({type(exc).__name__}: {exc}). numpy "
            "cannot hold bfloat16; store float32/float16/integer arrays."
        ) from exc


def _check_arrays(arrays: dict[str, np.ndarray]) -> None:
    if not arrays:
        raise _invalid("The dataset holds no arrays.")
    for name, array in arrays.items():
        if array.ndim == 0:
            raise _invalid(f"Array {name!r} is a scalar; every array needs a sample dimension.")
        if array.dtype.kind not in "biuf":
            raise _invalid(f"Array {name!r} has dtype {array.dtype}; use numeric arrays only.")
    counts = {name: int(a.shape[0]) for name, a in arrays.items()}
    if len(set(counts.values())) != 1:
        raise _invalid(
            "All arrays must share their first dimension (the number of samples); got "
            + ", ".join(f"{k}: {v}" for k, v in counts.items())
            + "."
        )
    if next(iter(counts.values())) == 0:
        raise _invalid("The dataset has no samples.")


def inspect_dataset(path: str | Path) -> dict[str, Any]:
    """Sample count, each array's shape and dtype, and whether a `labels` array is present."""
    arrays = load_dataset(path)
    return {
        "num_samples": int(next(iter(arrays.values())).shape[0]),
        "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()},
        "has_labels": LABELS in arrays,
    }


@dataclass(frozen=True)
class Samples:
    """Model inputs by input name (sample-major), optional integer labels, and their origin."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: Literal["dataset", "synthetic"]

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def take(self, n: int) -> Samples:
        """The first n samples."""
        labels = self.labels[:n] if self.labels is not None else None
        return Samples({k: v[:n] for k, v in self.inputs.items()}, labels, self.source)

    def subset(self, n: int, seed: int) -> Samples:
        """n samples drawn without replacement by a seeded shuffle (all of them if fewer)."""
        if n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
        labels = self.labels[idx] if self.labels is not None else None
        return Samples({k: v[idx] for k, v in self.inputs.items()}, labels, self.source)

    def select(self, idx: np.ndarray) -> Samples:
        labels = self.labels[idx] if self.labels is not None else None
        return Samples({k: v[idx] for k, v in self.inputs.items()}, labels, self.source)

    def split(self, holdout: float, seed: int) -> tuple[Samples, Samples]:
        """(train, held-out) with `holdout` of the samples held out, stratified by label."""
        rng = np.random.default_rng(seed)
        n = len(self)
        held: list[np.ndarray] = []
        if self.labels is not None and self.labels.ndim == 1:
            for label in np.unique(self.labels):
                members = rng.permutation(np.flatnonzero(self.labels == label))
                held.append(members[: int(round(holdout * len(members)))])
        else:
            held.append(rng.permutation(n)[: int(round(holdout * n))])
        mask = np.zeros(n, dtype=bool)
        mask[np.concatenate(held)] = True
        return self.select(np.flatnonzero(~mask)), self.select(np.flatnonzero(mask))


def _expected(spec: TensorSpec) -> str:
    dims = ["N", *[d if d is not None else "?" for d in spec.shape[1:]]]
    return f"[{', '.join(str(d) for d in dims)}] {spec.dtype}"


def _castable(src: np.dtype[Any], dst: np.dtype[Any]) -> bool:
    if src == dst:
        return True
    if dst.kind == "f":
        return src.kind in "biuf"
    if dst.kind in "iu":
        return src.kind in "biu" and np.can_cast(src, dst, "safe")
    return dst.kind == "b" and src.kind == "b"


class DatasetMismatch(EngineError):
    """A dataset that does not fit the model; `input` names the model input at fault."""

    def __init__(self, input_name: str, detail: str) -> None:
        super().__init__("dataset_mismatch", detail, field="dataset_id")
        self.input = input_name


def arrays_for_inputs(
    inputs: Sequence[TensorSpec], shapes: Mapping[str, Sequence[int]]
) -> dict[str, str]:
    """The dataset array (by name) that feeds each model input, checked for rank and fixed dims.

    The API checks a request with the shapes it recorded, the worker the arrays it loaded. An
    input takes the array named like it or, for a single-input model, `inputs` / `x`.
    """
    candidates = [name for name in shapes if name != LABELS]
    found: dict[str, str] = {}
    for spec in inputs:
        name = spec.name if spec.name in candidates else None
        if name is None and len(inputs) == 1:
            name = next((a for a in SINGLE_INPUT_ALIASES if a in candidates), None)
        if name is None:
            hint = (
                f"an array named {spec.name!r} (or 'inputs' / 'x', since the model has one input)"
                if len(inputs) == 1
                else f"one array per model input, named {', '.join(repr(s.name) for s in inputs)}"
            )
            raise DatasetMismatch(
                spec.name,
                f"Model input {spec.name!r} has no array in the dataset (it has: "
                f"{', '.join(sorted(shapes)) or 'nothing'}). Add {hint}, shaped "
                f"{_expected(spec)}.",
            )
        got = shapes[name]
        # An input with no recorded shape (shape ()) takes any array.
        shape_ok = (
            not spec.shape
            or len(got) == len(spec.shape)
            and all(
                not isinstance(want, int) or want == dim
                for want, dim in zip(spec.shape[1:], got[1:], strict=False)
            )
        )
        if not shape_ok:
            raise DatasetMismatch(
                spec.name,
                f"The dataset array for model input {spec.name!r} has shape "
                f"{list(got)}, but the model expects {_expected(spec)} (N samples).",
            )
        found[spec.name] = name
    return found


def match_inputs(
    arrays: dict[str, np.ndarray],
    inputs: Sequence[TensorSpec],
    *,
    use_labels: bool = True,
    outputs: Sequence[TensorSpec] = (),
) -> Samples:
    """One array per model input (by name, or `inputs`/`x` for a single input), checked and cast.

    Inputs must be finite (a NaN or Inf silently turns every score into garbage, so it is
    refused, naming the array and the first bad sample). Labels must be class indices of the
    model: non-negative and below the class count of its first output, when that is fixed.
    """
    names = arrays_for_inputs(inputs, {name: array.shape for name, array in arrays.items()})
    matched: dict[str, np.ndarray] = {}
    for spec in inputs:
        array = arrays[names[spec.name]]
        want = np.dtype(spec.dtype)
        if not _castable(array.dtype, want):
            raise DatasetMismatch(
                spec.name,
                f"The dataset array for model input {spec.name!r} has dtype {array.dtype}, "
                f"which does not convert safely to the model's {want}. Save it as {want}.",
            )
        matched[spec.name] = _finite(spec.name, np.ascontiguousarray(array, dtype=want))
    labels = _labels(arrays.get(LABELS), num_classes(outputs)) if use_labels else None
    return Samples(matched, labels, "dataset")


def _finite(name: str, array: np.ndarray) -> np.ndarray:
    if array.dtype.kind != "f":
        return array
    bad = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise EngineError(
            "dataset_invalid",
            f"The dataset array for model input {name!r} holds NaN or Inf in {len(rows)} of "
            f"{len(array)} samples (first at sample {int(rows[0])}). Drop or impute those "
            "samples (e.g. `x[np.isfinite(x).all(axis=tuple(range(1, x.ndim)))]`) and upload "
            "again.",
            field="dataset_id",
        )
    return array


def num_classes(outputs: Sequence[TensorSpec]) -> int | None:
    """The class count of a classifier: the fixed last dim of its first output, if any."""
    if not outputs or len(outputs[0].shape) < 2:
        return None
    last = outputs[0].shape[-1]
    return last if isinstance(last, int) and last > 0 else None


def _labels(labels: np.ndarray | None, classes: int | None = None) -> np.ndarray | None:
    if labels is None:
        return None
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    integral = labels.dtype.kind in "biu" or (
        labels.dtype.kind == "f" and bool(np.all(np.mod(labels, 1) == 0))
    )
    if labels.ndim != 1 or not integral:
        raise EngineError(
            "dataset_mismatch",
            f"`labels` must be integer class indices shaped [N]; got shape {list(labels.shape)} "
            f"and dtype {labels.dtype}. For one-hot labels save `labels.argmax(1)`.",
            field="dataset_id",
        )
    labels = labels.astype(np.int64)
    low, high = (int(labels.min()), int(labels.max())) if len(labels) else (0, 0)
    if low < 0 or (classes is not None and high >= classes):
        allowed = f"0 … {classes - 1}" if classes is not None else "0 or more"
        raise EngineError(
            "dataset_invalid",
            f"The `labels` array holds class indices from {low} to {high}, but the model's "
            f"classes are {allowed}. Store each label as the index of the model output it "
            "should score highest.",
            field="dataset_id",
        )
    return labels


def synthetic(inputs: Sequence[TensorSpec], n: int = SYNTHETIC_SAMPLES, seed: int = 0) -> Samples:
    """Random-normal inputs from the input spec (dynamic dims become 1), for lack of a dataset."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for spec in inputs:
        dims = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape[1:]]
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            arrays[spec.name] = rng.standard_normal((n, *dims)).astype(dtype)
        elif dtype.kind == "b":
            arrays[spec.name] = rng.integers(0, 2, (n, *dims)).astype(bool)
        else:
            arrays[spec.name] = rng.integers(0, 2, (n, *dims)).astype(dtype)
    return Samples(arrays, None, "synthetic")
