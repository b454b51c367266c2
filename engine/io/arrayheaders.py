"""Dataset file headers (.npz members' .npy headers, the safetensors JSON), validated in full.

One rule for the API's upload check and the sandbox's loader: every array's shape, dtype and
byte size must agree with the bytes the file really holds, before anything is loaded or
recorded. Only headers are read; zip bounds come from engine/safezip.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from numpy.lib import format as npy_format

from engine.errors import EngineError
from engine.io.safezip import ZipLimits, open_zip

DatasetFormat = Literal["npz", "safetensors"]
NUMERIC_KINDS = "biuf"
MAX_NPY_HEADER_BYTES = 64 * 1024
MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype -> (numpy-style name, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}


class HeaderError(EngineError):
    """A dataset header that lies or is malformed; `location` names the header field."""

    def __init__(self, location: str, detail: str, field: str) -> None:
        super().__init__("dataset_invalid", f"{location}: {detail}", field=field)
        self.location = location


@dataclass(frozen=True)
class ArrayHeader:
    """One array as its header declares it (checked against the bytes that hold it)."""

    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}


def _shape(value: Any, location: str, field: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise HeaderError(
            location,
            f"shape must be a list of non-negative integers; got {value!r}.",
            field,
        )
    return tuple(value)


def detect_dataset_format(path: Path, field: str) -> DatasetFormat:
    """npz (a zip of .npy files) or safetensors (u64 header length, then a JSON object)."""
    with path.open("rb") as fh:
        head = fh.read(9)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "npz"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    raise EngineError(
        "dataset_invalid",
        "The dataset is neither a NumPy .npz archive nor a .safetensors file. Save one array "
        "per model input (named like the input, or 'x'/'inputs' for a single input) plus an "
        "optional 'labels' array: `np.savez('data.npz', x=inputs, labels=labels)` or "
        "`safetensors.numpy.save_file(...)`.",
        field=field,
    )


def _npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, field: str) -> ArrayHeader:
    with zf.open(info) as fh:
        try:
            version = npy_format.read_magic(fh)
            if version == (1, 0):
                header = npy_format.read_array_header_1_0(fh, MAX_NPY_HEADER_BYTES)
            else:
                header = npy_format.read_array_header_2_0(fh, MAX_NPY_HEADER_BYTES)
        except (ValueError, TypeError, SyntaxError, EOFError) as exc:
            raise HeaderError(name, f"not a valid .npy header ({exc}).", field) from exc
        header_bytes = fh.tell()
    raw_shape, _fortran, dtype = header
    shape = _shape(raw_shape, f"{name}.shape", field)
    if dtype.hasobject or dtype.kind not in NUMERIC_KINDS:
        raise HeaderError(
            f"{name}.dtype",
            f"dtype {dtype} is not numeric; save float/int/bool arrays only (never object "
            "arrays, which need pickle).",
            field,
        )
    declared = math.prod(shape) * dtype.itemsize
    held = info.file_size - header_bytes
    if declared != held:
        raise HeaderError(
            f"{name}.shape",
            f"shape {list(shape)} × {dtype} needs {declared} bytes but the member holds {held}; "
            "the header does not describe the data. Save the file again with np.savez.",
            field,
        )
    return ArrayHeader(shape, str(dtype))


def read_npz_headers(path: Path, limits: ZipLimits, field: str) -> dict[str, ArrayHeader]:
    """Every member's .npy header, after the zip bounds; reads only header bytes."""
    arrays: dict[str, ArrayHeader] = {}
    with open_zip(path, limits, field=field, damaged_code="dataset_invalid") as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy") or info.is_dir():
                raise HeaderError(
                    info.filename,
                    "unexpected member in the .npz; it may hold only .npy arrays.",
                    field,
                )
            arrays[info.filename[:-4]] = _npy_header(zf, info, info.filename[:-4], field)
    return arrays


def read_safetensors_headers(path: Path, field: str) -> dict[str, ArrayHeader]:
    """The JSON header; every entry's dtype, shape and data_offsets checked against the file."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise HeaderError("header", "the file is too short to hold a header.", field)
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, MAX_SAFETENSORS_HEADER_BYTES):
            raise HeaderError(
                "header",
                f"the header length {header_len} is larger than the file or than "
                f"{MAX_SAFETENSORS_HEADER_BYTES} bytes.",
                field,
            )
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HeaderError("header", f"not valid JSON ({exc}).", field) from exc
    if not isinstance(header, dict):
        raise HeaderError("header", "must be a JSON object of arrays.", field)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise HeaderError("__metadata__", "must be an object of string values.", field)
    data_len = size - 8 - header_len
    arrays: dict[str, ArrayHeader] = {}
    spans: list[tuple[int, int, str]] = []
    for name, meta in header.items():
        if not isinstance(meta, dict):
            raise HeaderError(name, f"must be an object; got {meta!r}.", field)
        entry = SAFETENSORS_DTYPES.get(meta.get("dtype"))  # type: ignore[arg-type]
        if entry is None:
            raise HeaderError(
                f"{name}.dtype",
                f"unsupported dtype {meta.get('dtype')!r}; use one of "
                f"{', '.join(SAFETENSORS_DTYPES)}.",
                field,
            )
        dtype, itemsize = entry
        shape = _shape(meta.get("shape"), f"{name}.shape", field)
        offsets = meta.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise HeaderError(
                f"{name}.data_offsets",
                f"must be [begin, end] with 0 ≤ begin ≤ end ≤ {data_len} (the data size); "
                f"got {offsets!r}.",
                field,
            )
        declared = math.prod(shape) * itemsize
        if offsets[1] - offsets[0] != declared:
            raise HeaderError(
                f"{name}.shape",
                f"shape {list(shape)} × {dtype} needs {declared} bytes but data_offsets "
                f"span {offsets[1] - offsets[0]}; the header does not describe the data.",
                field,
            )
        spans.append((offsets[0], offsets[1], name))
        arrays[name] = ArrayHeader(shape, dtype)
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise HeaderError(
                f"{name}.data_offsets",
                f"begins at {begin} but the previous array ends at {position}: arrays "
                "overlap or leave a gap.",
                field,
            )
        position = end
    if position != data_len:
        raise HeaderError(
            "data_offsets",
            f"the arrays cover {position} bytes but the file holds {data_len} bytes of data.",
            field,
        )
    return arrays


def read_headers(
    path: str | Path, limits: ZipLimits, field: str
) -> tuple[DatasetFormat, dict[str, ArrayHeader]]:
    """Format and validated array headers of a dataset file; raises EngineError otherwise."""
    path = Path(path)
    fmt = detect_dataset_format(path, field)
    if fmt == "npz":
        return fmt, read_npz_headers(path, limits, field)
    return fmt, read_safetensors_headers(path, field)
