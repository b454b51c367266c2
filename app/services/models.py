"""Models: accept an upload, store it, record it, then ask the worker to inspect it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.config import Settings
from app.db.models import Model, ModelStatus
from app.db.repositories import ModelInspectionRepository
from app.services.publishing import publish_inspection
from app.services.sniff import sniff_model
from app.services.uploaded import UploadedKind

# "torchscript" names only rows uploaded before TorchScript was refused (still downloadable).
EXTENSIONS = {"onnx": "onnx", "pt2": "pt2", "torchscript": "pt"}


def _describe(path: Path) -> tuple[str, dict[str, Any]]:
    fmt = sniff_model(path)
    return EXTENSIONS[fmt], {"format": fmt, "status": ModelStatus.pending}


def _inspect(session: Session, settings: Settings, model_id: str) -> None:
    """After the commit; a failed publish leaves the model pending for the reconciler. The row
    is locked first, so a reconciler pass never publishes it at the same time."""
    if ModelInspectionRepository(session).lock_if_unpublished(model_id):
        publish_inspection(session, settings, model_id)
    session.commit()


MODELS = UploadedKind(
    "model",
    Model,
    blob_stem="model",
    job_column="model_id",
    describe=_describe,
    on_created=_inspect,
)
