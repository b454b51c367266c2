"""Cheap, safe content checks the API runs on uploads: no unpickling, no model execution.

The worker does the full inspection in a sandbox; this only refuses what is clearly not a model
or dataset, so that the uploader gets an immediate, actionable 422. Only headers are read: zip
archives are bounded from their central directory (engine/safezip) before any member is
opened, and the members read are capped at a few bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.errors import Invalid
from engine.errors import EngineError
from engine.io.arrayheaders import HeaderError, read_headers
from engine.io.formats import detect_format
from engine.io.safezip import ZipLimits

UPLOAD_ZIP_LIMITS = ZipLimits()


def _invalid(exc: EngineError) -> Invalid:
    location = exc.location if isinstance(exc, HeaderError) else None
    extra: dict[str, Any] = {"location": location} if location else {}
    return Invalid(exc.code, exc.detail, field=exc.field or "file", **extra)


def sniff_model(path: Path) -> str:
    """'onnx' | 'pt2' from the content, or a 422 saying what to upload instead (TorchScript too).

    The engine's detection reads only bounded zip listings (safezip), a capped `archive_format`
    member, protobuf field headers and pickle opcodes (standard library, nothing executed), so
    the API can run it without torch.
    """
    try:
        return detect_format(path)
    except EngineError as exc:
        raise _invalid(exc) from exc


def _dataset_invalid(detail: str) -> Invalid:
    return Invalid("dataset_invalid", detail, field="file")


def sniff_dataset(path: Path) -> dict[str, Any]:
    """Validated array headers; return format, arrays, num_samples, has_labels or raise 422."""
    try:
        fmt, headers = read_headers(path, UPLOAD_ZIP_LIMITS, field="file")
    except EngineError as exc:
        raise _invalid(exc) from exc
    arrays = {name: header.to_dict() for name, header in headers.items()}
    if not arrays:
        raise _dataset_invalid("The dataset has no arrays.")
    counts = {name: spec["shape"][0] if spec["shape"] else None for name, spec in arrays.items()}
    if None in counts.values() or len(set(counts.values())) != 1:
        raise _dataset_invalid(
            "Every array must have the sample count as its first dimension and all must agree; "
            f"got first dimensions {counts}."
        )
    num_samples = next(iter(counts.values()))
    if num_samples == 0:
        raise _dataset_invalid("The dataset has zero samples.")
    if "labels" in arrays:
        labels = arrays["labels"]
        if (
            labels["dtype"][0] not in "iu"
            and labels["dtype"] != "bool"
            or len(labels["shape"]) != 1
        ):
            raise _dataset_invalid(
                "'labels' must be a 1-D integer array of class indices, one per sample; got "
                f"shape {labels['shape']} dtype {labels['dtype']}."
            )
        if len(arrays) == 1:
            raise _dataset_invalid("The dataset has 'labels' but no input arrays.")
    return {
        "format": fmt,
        "arrays": arrays,
        "num_samples": int(num_samples or 0),
        "has_labels": "labels" in arrays,
    }
