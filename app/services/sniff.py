"""Cheap, safe content checks the API runs on uploads: no unpickling, no model execution.

The worker does the full inspection in a sandbox; this only refuses what is clearly not a model
or dataset, so that the uploader gets an immediate, actionable 422.
"""

from __future__ import annotations

import json
import mmap
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

from app.api.problems import Problem

EXPORT_HOWTO = (
    "Export the model instead: "
    "`torch.export.save(torch.export.export(model.eval(), (example_input,)), 'model.pt2')` "
    "or `torch.onnx.export(model.eval(), (example_input,), 'model.onnx', dynamo=True)`."
)
ACCEPTED = "Accepted formats: ONNX (.onnx), torch.export ExportedProgram (.pt2), TorchScript (.pt)."


def pickle_refused(what: str) -> Problem:
    return Problem(
        422,
        "pickle_refused",
        f"The file is {what}. Pickle files are refused because loading one runs arbitrary "
        f"code. {EXPORT_HOWTO}",
        field="file",
    )


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("varint runs past the end")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _onnx_wire_check(path: Path) -> None:
    """Walk the top-level protobuf fields of an ONNX ModelProto without decoding them."""
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            _walk_fields(view)
        finally:
            view.release()


def _walk_fields(data: memoryview) -> None:
    """Skip over each field by its declared length (the file is mapped, not read into memory)."""
    pos, seen = 0, set()
    ir_version = None
    while pos < len(data):
        try:
            key, pos = _read_varint(data, pos)
            field, wire = key >> 3, key & 7
            if field == 0 or field > 64 or wire not in (0, 1, 2, 5):
                raise ValueError("not a protobuf field")
            if wire == 0:
                value, pos = _read_varint(data, pos)
                if field == 1:
                    ir_version = value
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            else:
                length, pos = _read_varint(data, pos)
                if pos + length > len(data):
                    if ir_version is not None:
                        raise Problem(
                            422,
                            "invalid_model",
                            f"The ONNX file is truncated: field {field} declares {length} bytes "
                            f"but only {len(data) - pos} remain. Upload the complete file "
                            "(check the export finished and the transfer was not cut off).",
                            field="file",
                        )
                    raise ValueError("length past the end")
                pos += length
            seen.add(field)
        except ValueError as exc:
            raise Problem(
                422,
                "unrecognized_format",
                f"The file is not a model we can read. {ACCEPTED}",
                field="file",
            ) from exc
    if pos != len(data) or 1 not in seen or 7 not in seen or not ir_version:
        raise Problem(
            422,
            "unrecognized_format",
            f"The file is not a model we can read. {ACCEPTED}",
            field="file",
        )


def sniff_model(path: Path) -> str:
    """Return 'onnx' | 'pt2' | 'torchscript' from the content, or raise a 422 Problem."""
    with path.open("rb") as fh:
        head = fh.read(8)
    if not head:
        raise Problem(422, "unrecognized_format", f"The file is empty. {ACCEPTED}", field="file")
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        raise pickle_refused("a raw Python pickle (torch.save or pickle.dump)")
    if zipfile.is_zipfile(path):
        try:
            names = zipfile.ZipFile(path).namelist()
        except zipfile.BadZipFile as exc:
            raise Problem(
                422, "invalid_model", "The zip archive is corrupt; upload it again.", field="file"
            ) from exc
        tails = {n.split("/", 1)[1] for n in names if "/" in n}
        if "archive_format" in tails or any(t.startswith("models/") for t in tails):
            return "pt2"
        if any(t.startswith("code/") for t in tails) and "constants.pkl" in tails:
            return "torchscript"
        if "data.pkl" in tails:
            raise pickle_refused("a torch.save() checkpoint (a pickled module or state_dict)")
        raise Problem(
            422, "unrecognized_format", f"The zip archive is not a model. {ACCEPTED}", field="file"
        )
    _onnx_wire_check(path)
    return "onnx"


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
        "num_samples": int(num_samples),
        "has_labels": "labels" in arrays,
    }
