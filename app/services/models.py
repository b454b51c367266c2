"""Models: accept an upload, store it, record it, then ask the worker to inspect it."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.api.problems import Problem, not_found
from app.config import Settings
from app.db.base import new_id
from app.db.models import Job, Model, ModelStatus
from app.db.models.job import TERMINAL_STATUSES
from app.db.repositories import Page, TeamRepository
from app.queue import TASK_INSPECT_MODEL, publish
from app.services import idempotency
from app.services.common import page_or_422
from app.services.idempotency import IdempotentRequest
from app.services.sniff import sniff_model
from app.services.uploads import Upload
from app.storage import BlobStore

log = logging.getLogger(__name__)

# "torchscript" names only rows uploaded before TorchScript was refused (still downloadable).
EXTENSIONS = {"onnx": "onnx", "pt2": "pt2", "torchscript": "pt"}


def _repo(session: Session, team_id: str) -> TeamRepository[Model]:
    return TeamRepository(session, Model, team_id)


def create(
    session: Session,
    storage: BlobStore,
    settings: Settings,
    team_id: str,
    upload: Upload,
    name: str | None,
    idem: IdempotentRequest | None = None,
) -> Model:
    try:
        fmt = sniff_model(upload.path)
    except Problem:
        upload.discard()
        raise
    model_id = new_id()
    key = f"teams/{team_id}/models/{model_id}/model.{EXTENSIONS[fmt]}"
    storage.put_file(key, upload.path)
    default_name = Path(upload.filename).stem if upload.filename else f"model-{model_id[:8]}"
    try:
        model = _repo(session, team_id).create(
            id=model_id,
            name=(name or default_name)[:200],
            format=fmt,
            status=ModelStatus.pending,
            size_bytes=upload.size,
            sha256=upload.sha256,
            blob_key=key,
        )
        if idem is not None:
            idempotency.remember(session, team_id, idem, 201, model.id, f"/v1/models/{model.id}")
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        storage.delete(key)
        raise idempotency.in_use() from exc
    except Exception:
        storage.delete(key)
        raise
    publish(settings, TASK_INSPECT_MODEL, model.id)
    return model


def get_or_raise(session: Session, team_id: str, model_id: str) -> Model:
    model = _repo(session, team_id).get(model_id)
    if model is None:
        raise not_found("model", model_id)
    return model


def get_page(session: Session, team_id: str, limit: int, cursor: str | None) -> Page[Model]:
    return page_or_422(lambda: _repo(session, team_id).get_page(limit, cursor))


def delete(session: Session, storage: BlobStore, team_id: str, model_id: str) -> None:
    model = get_or_raise(session, team_id, model_id)
    active = session.scalars(
        select(Job.id).where(Job.model_id == model.id, Job.status.not_in(TERMINAL_STATUSES))
    ).first()
    if active:
        raise Problem(
            409,
            "model_in_use",
            f"Job {active} is still using this model; cancel it or wait until it finishes.",
        )
    key = model.blob_key
    _repo(session, team_id).delete(model)
    session.commit()
    storage.delete(key)
