from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel

from app.schemas.common import ErrorInfo, ReadModel


class TensorSpec(BaseModel):
    name: str
    shape: list[int | str | None]
    dtype: str


class ModelRead(ReadModel):
    """An uploaded model; inputs/outputs/params appear once the worker inspected it."""

    id: str
    name: str
    format: Literal["onnx", "pt2", "torchscript"]
    status: Literal["pending", "ready", "invalid"]
    size_bytes: int
    sha256: str
    inputs: list[TensorSpec] | None
    outputs: list[TensorSpec] | None
    params: int | None
    opset: int | None
    error: ErrorInfo | None
    created_at: datetime
