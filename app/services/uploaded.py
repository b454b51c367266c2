"""Models and datasets are both uploaded files: one flow stores, records, reads and deletes them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.base import Base, new_id
from app.db.repositories import Page, TeamJobRepository, TeamRepository
from app.errors import Conflict, not_found
from app.services import idempotency
from app.services.common import page_or_422
from app.services.idempotency import IdempotentRequest
from app.services.spool import Upload
from app.storage import BlobStore

T = TypeVar("T", bound=Base)

# describe(spooled file) -> (blob extension, the row's own columns), or raise Invalid
Describe = Callable[[Path], tuple[str, dict[str, Any]]]


@dataclass(frozen=True)
class UploadedKind(Generic[T]):
    """What differs between a model and a dataset."""

    name: str  # "model": its API collection, messages, default names and in-use code
    table: type[T]
    blob_stem: str  # teams/{team}/{name}s/{id}/{blob_stem}.{extension}
    job_column: str  # the Job column that refers to it
    describe: Describe
    # After the commit, with the id (it may write and commit again).
    on_created: Callable[[Session, Settings, str], None] | None = None

    @property
    def collection(self) -> str:
        return f"/v1/{self.name}s"

    def repo(self, session: Session, team_id: str) -> TeamRepository[T]:
        return TeamRepository(session, self.table, team_id)


def create(
    session: Session,
    storage: BlobStore,
    settings: Settings,
    kind: UploadedKind[T],
    team_id: str,
    upload: Upload,
    name: str | None,
    idem: IdempotentRequest | None = None,
) -> T:
    """Check the upload's content, store it and record its row in one commit (422 if refused)."""
    extension, values = kind.describe(upload.path)
    object_id = new_id()
    key = f"teams/{team_id}/{kind.name}s/{object_id}/{kind.blob_stem}.{extension}"
    storage.put_file(key, upload.path)
    default_name = Path(upload.filename).stem if upload.filename else f"{kind.name}-{object_id[:8]}"
    try:
        row = kind.repo(session, team_id).create(
            id=object_id,
            name=(name or default_name)[:200],
            size_bytes=upload.size,
            sha256=upload.sha256,
            blob_key=key,
            **values,
        )
        if idem is not None:
            location = f"{kind.collection}/{object_id}"
            idempotency.remember(session, team_id, idem, 201, object_id, location)
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        storage.delete(key)
        raise idempotency.in_use() from exc
    except Exception:
        storage.delete(key)
        raise
    if kind.on_created is not None:
        kind.on_created(session, settings, object_id)
    return row


def get_or_raise(session: Session, kind: UploadedKind[T], team_id: str, object_id: str) -> T:
    row = kind.repo(session, team_id).get(object_id)
    if row is None:
        raise not_found(kind.name, object_id)
    return row


def get_page(
    session: Session, kind: UploadedKind[T], team_id: str, limit: int, cursor: str | None
) -> Page[T]:
    return page_or_422(lambda: kind.repo(session, team_id).get_page(limit, cursor))


def delete(
    session: Session, storage: BlobStore, kind: UploadedKind[T], team_id: str, object_id: str
) -> None:
    """Delete the row and its blob, unless an unfinished job still uses it (409)."""
    row = get_or_raise(session, kind, team_id, object_id)
    active = TeamJobRepository(session, team_id).first_active_using(**{kind.job_column: object_id})
    if active:
        raise Conflict(
            f"{kind.name}_in_use",
            f"Job {active} is still using this {kind.name}; cancel it or wait until it finishes.",
        )
    key = row.blob_key  # type: ignore[attr-defined]
    kind.repo(session, team_id).delete(row)
    session.commit()
    storage.delete(key)
