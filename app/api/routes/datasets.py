from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from app.api.deps import (
    CurrentTeam,
    PageDep,
    SessionDep,
    SettingsDep,
    StorageDep,
    open_session,
)
from app.api.idempotency import IdempotencyKeyHeader, replay, request_for
from app.api.routes.models import UPLOAD_BODY
from app.config import Settings
from app.schemas.common import Page
from app.schemas.datasets import DatasetRead
from app.services import datasets as dataset_service
from app.services.idempotency import save_response
from app.services.uploads import Upload, receive_upload
from app.storage import BlobStore

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post("", status_code=201, response_model=DatasetRead, openapi_extra=UPLOAD_BODY)
async def upload_dataset(
    request: Request,
    response: Response,
    team: CurrentTeam,
    storage: StorageDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Any:
    """Upload a .npz or .safetensors dataset: one array per model input plus optional labels."""
    upload = await receive_upload(
        request,
        settings.tmp_dir,
        settings.max_upload_bytes,
        idle_timeout_s=settings.upload_idle_timeout_s,
        deadline_s=settings.upload_deadline_s,
    )
    try:
        body, location = await run_in_threadpool(
            _store, storage, settings, team.id, upload, idempotency_key
        )
    finally:
        upload.discard()
    if location:
        response.headers["Location"] = location
    return body


def _store(
    storage: BlobStore,
    settings: Settings,
    team_id: str,
    upload: Upload,
    idempotency_key: str | None,
) -> tuple[Any, str | None]:
    """Sniff, store and record the upload (blocking work, run in a worker thread)."""
    name = upload.fields.get("name")
    idem = request_for(idempotency_key, "POST /v1/datasets", upload.sha256, name)
    with open_session(settings) as session:
        replayed = replay(session, team_id, idem, lambda i: _read(session, team_id, i))
        if replayed is not None:
            return replayed, None
        dataset = dataset_service.create(session, storage, team_id, upload, name, idem)
        body = DatasetRead.model_validate(dataset)
        if idem is not None:
            save_response(session, team_id, idem, body.model_dump(mode="json"))
        return body, f"/v1/datasets/{dataset.id}"


def _read(session: SessionDep, team_id: str, dataset_id: str) -> dict[str, Any]:
    dataset = dataset_service.get_or_raise(session, team_id, dataset_id)
    return DatasetRead.model_validate(dataset).model_dump(mode="json")


@router.get("", response_model=Page[DatasetRead])
def list_datasets(team: CurrentTeam, session: SessionDep, page: PageDep) -> Page[DatasetRead]:
    result = dataset_service.get_page(session, team.id, page.limit, page.cursor)
    return Page(
        items=[DatasetRead.model_validate(d) for d in result.items],
        next_cursor=result.next_cursor,
    )


@router.get("/{dataset_id}", response_model=DatasetRead)
def get_dataset(dataset_id: str, team: CurrentTeam, session: SessionDep) -> DatasetRead:
    return DatasetRead.model_validate(dataset_service.get_or_raise(session, team.id, dataset_id))


@router.delete("/{dataset_id}", status_code=204)
def delete_dataset(
    dataset_id: str, team: CurrentTeam, session: SessionDep, storage: StorageDep
) -> Response:
    dataset_service.delete(session, storage, team.id, dataset_id)
    return Response(status_code=204)
