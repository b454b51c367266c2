"""Datasets: read array headers (never pickles), store the file, record it."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.api.problems import Problem, not_found
from app.db.base import new_id
from app.db.models import Dataset, Job
from app.db.models.job import TERMINAL_STATUSES
from app.db.repositories import Page, TeamRepository
from app.services import idempotency
from app.services.common import page_or_422
from app.services.idempotency import IdempotentRequest
from app.services.sniff import sniff_dataset
from app.services.uploads import Upload
from app.storage import BlobStore


def _repo(session: Session, team_id: str) -> TeamRepository[Dataset]:
    return TeamRepository(session, Dataset, team_id)


def create(
    session: Session,
    storage: BlobStore,
    team_id: str,
    upload: Upload,
    name: str | None,
    idem: IdempotentRequest | None = None,
) -> Dataset:
    try:
        info = sniff_dataset(upload.path)
    except Problem:
        upload.discard()
        raise
    dataset_id = new_id()
    key = f"teams/{team_id}/datasets/{dataset_id}/data.{info['format']}"
    storage.put_file(key, upload.path)
    default_name = Path(upload.filename).stem if upload.filename else f"dataset-{dataset_id[:8]}"
    try:
        dataset = _repo(session, team_id).create(
            id=dataset_id,
            name=(name or default_name)[:200],
            size_bytes=upload.size,
            sha256=upload.sha256,
            blob_key=key,
            **info,
        )
        if idem is not None:
            location = f"/v1/datasets/{dataset.id}"
            idempotency.remember(session, team_id, idem, 201, dataset.id, location)
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        storage.delete(key)
        raise idempotency.in_use() from exc
    except Exception:
        storage.delete(key)
        raise
    return dataset


def get_or_raise(session: Session, team_id: str, dataset_id: str) -> Dataset:
    dataset = _repo(session, team_id).get(dataset_id)
    if dataset is None:
        raise not_found("dataset", dataset_id)
    return dataset


def get_page(session: Session, team_id: str, limit: int, cursor: str | None) -> Page[Dataset]:
    return page_or_422(lambda: _repo(session, team_id).get_page(limit, cursor))


def delete(session: Session, storage: BlobStore, team_id: str, dataset_id: str) -> None:
    dataset = get_or_raise(session, team_id, dataset_id)
    active = session.scalars(
        select(Job.id).where(Job.dataset_id == dataset.id, Job.status.not_in(TERMINAL_STATUSES))
    ).first()
    if active:
        raise Problem(
            409,
            "dataset_in_use",
            f"Job {active} is still using this dataset; cancel it or wait until it finishes.",
        )
    key = dataset.blob_key
    _repo(session, team_id).delete(dataset)
    session.commit()
    storage.delete(key)
