from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel

from app.schemas.common import ReadModel


class ArraySpec(BaseModel):
    shape: list[int]
    dtype: str


class DatasetRead(ReadModel):
    id: str
    name: str
    format: Literal["npz", "safetensors"]
    size_bytes: int
    sha256: str
    num_samples: int
    arrays: dict[str, ArraySpec]
    has_labels: bool
    created_at: datetime
