"""One upload flow for models and datasets: stream the body, then store it off the event loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request, Response
from pydantic import BaseModel
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.deps import open_session
from app.api.idempotency import replay, request_for
from app.config import Settings
from app.services.idempotency import save_response
from app.services.uploads import Upload, receive_upload
from app.storage import BlobStore

# create(session, storage, settings, team_id, upload, name, idempotency request) -> ORM row
Create = Callable[[Session, BlobStore, Settings, str, Upload, str | None, Any], Any]


@dataclass(frozen=True)
class UploadKind:
    """What differs between a model and a dataset upload."""

    collection: str  # "/v1/models"
    create: Create
    get_or_raise: Callable[[Session, str, str], Any]
    schema: type[BaseModel]


async def accept_upload(
    kind: UploadKind,
    request: Request,
    response: Response,
    team_id: str,
    storage: BlobStore,
    settings: Settings,
    idempotency_key: str | None,
) -> Any:
    """Receive the body (no DB session held meanwhile), then sniff, store and record it."""
    upload = await receive_upload(
        request,
        settings.tmp_dir,
        settings.max_upload_bytes,
        idle_timeout_s=settings.upload_idle_timeout_s,
        deadline_s=settings.upload_deadline_s,
    )
    try:
        body, location = await run_in_threadpool(
            _store, kind, storage, settings, team_id, upload, idempotency_key
        )
    finally:
        upload.discard()
    if location:
        response.headers["Location"] = location
    return body


def _store(
    kind: UploadKind,
    storage: BlobStore,
    settings: Settings,
    team_id: str,
    upload: Upload,
    idempotency_key: str | None,
) -> tuple[Any, str | None]:
    """Sniff, store and record the upload (blocking work, run in a worker thread)."""
    name = upload.fields.get("name")
    idem = request_for(idempotency_key, f"POST {kind.collection}", upload.sha256, name)
    with open_session(settings) as session:

        def read(row_id: str) -> dict[str, Any]:
            row = kind.get_or_raise(session, team_id, row_id)
            return kind.schema.model_validate(row).model_dump(mode="json")

        replayed = replay(session, team_id, idem, read)
        if replayed is not None:
            return replayed, None
        row = kind.create(session, storage, settings, team_id, upload, name, idem)
        body = kind.schema.model_validate(row)
        if idem is not None:
            save_response(session, team_id, idem, body.model_dump(mode="json"))
        return body, f"{kind.collection}/{row.id}"
