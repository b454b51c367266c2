"""Datasets: read array headers (never pickles), store the file, record it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.db.models import Dataset
from app.services.sniff import sniff_dataset
from app.services.uploaded import UploadedKind


def _describe(path: Path) -> tuple[str, dict[str, Any]]:
    info = sniff_dataset(path)
    return info["format"], info


DATASETS = UploadedKind(
    "dataset", Dataset, blob_stem="data", job_column="dataset_id", describe=_describe
)
