"""Cheap, safe content checks the API runs on uploads: no unpickling, no model execution.

The worker does the full inspection in a sandbox; this only refuses what is clearly not a model
or dataset, so that the uploader gets an immediate, actionable 422.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

from app.api.problems import Problem
from worker.engine.errors import EngineError
from worker.engine.formats import detect_format


def sniff_model(path: Path) -> str:
    """'onnx' | 'pt2' | 'torchscript' from the content, or a 422 saying what to upload instead.

    The engine's detection reads only zip listings, protobuf field headers and pickle opcodes
    (standard library, nothing executed), so the API can run it without torch.
    """
    try:
        return detect_format(path)
    except EngineError as exc:
        raise Problem(422, exc.code, exc.detail, field=exc.field or "file") from exc


def _dataset_problem(detail: str) -> Problem:
    return Problem(422, "dataset_invalid", detail, field="file")


def _check_dtype(name: str, dtype: np.dtype[Any]) -> str:
    if dtype.hasobject or dtype.kind not in "biuf":
        raise _dataset_problem(
            f"Array {name!r} has dtype {dtype}; only numeric arrays are accepted "
            "(save with numpy arrays of float/int/bool, never object arrays)."
        )
    return str(dtype)


def _npz_arrays(path: Path) -> dict[str, dict[str, Any]]:
    arrays: dict[str, dict[str, Any]] = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                raise _dataset_problem(f"Unexpected member {info.filename!r} in the .npz file.")
            name = info.filename[:-4]
            with zf.open(info) as fh:
                try:
                    version = npy_format.read_magic(fh)
                    read_header = (
                        npy_format.read_array_header_1_0
                        if version == (1, 0)
                        else npy_format.read_array_header_2_0
                    )
                    shape, _fortran, dtype = read_header(fh)
                except ValueError as exc:
                    raise _dataset_problem(f"Array {name!r} is not a valid .npy: {exc}") from exc
            arrays[name] = {"shape": list(shape), "dtype": _check_dtype(name, dtype)}
    return arrays


_ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def _safetensors_arrays(path: Path) -> dict[str, dict[str, Any]]:
    size = path.stat().st_size
    with path.open("rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > min(size - 8, 100 * 1024 * 1024):
            raise _dataset_problem("The safetensors header length is larger than the file.")
        try:
            header = json.loads(fh.read(header_len))
        except ValueError as exc:
            raise _dataset_problem("The safetensors header is not valid JSON.") from exc
    arrays = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise _dataset_problem(f"Array {name!r} has unsupported dtype {meta.get('dtype')!r}.")
        arrays[name] = {"shape": list(meta["shape"]), "dtype": dtype}
    return arrays


def sniff_dataset(path: Path) -> dict[str, Any]:
    """Read array headers only; return format, arrays, num_samples, has_labels or raise 422."""
    with path.open("rb") as fh:
        head = fh.read(9)
    if zipfile.is_zipfile(path):
        fmt, arrays = "npz", _npz_arrays(path)
    elif len(head) == 9 and head[8:9] == b"{":
        fmt, arrays = "safetensors", _safetensors_arrays(path)
    else:
        raise _dataset_problem(
            "The file is neither .npz (np.savez) nor .safetensors. Save one array per model "
            "input (named like the input, or 'x'/'inputs' for a single input) plus an optional "
            "'labels' array."
        )
    if not arrays:
        raise _dataset_problem("The dataset has no arrays.")
    counts = {name: spec["shape"][0] if spec["shape"] else None for name, spec in arrays.items()}
    if None in counts.values() or len(set(counts.values())) != 1:
        raise _dataset_problem(
            "Every array must have the sample count as its first dimension and all must agree; "
            f"got first dimensions {counts}."
        )
    num_samples = next(iter(counts.values()))
    if num_samples == 0:
        raise _dataset_problem("The dataset has zero samples.")
    if "labels" in arrays:
        labels = arrays["labels"]
        if (
            labels["dtype"][0] not in "iu"
            and labels["dtype"] != "bool"
            or len(labels["shape"]) != 1
        ):
            raise _dataset_problem(
                "'labels' must be a 1-D integer array of class indices, one per sample; got "
                f"shape {labels['shape']} dtype {labels['dtype']}."
            )
        if len(arrays) == 1:
            raise _dataset_problem("The dataset has 'labels' but no input arrays.")
    return {
        "format": fmt,
        "arrays": arrays,
        "num_samples": int(num_samples or 0),
        "has_labels": "labels" in arrays,
    }
