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
from app.api.downloads import blob_response
from app.api.idempotency import IdempotencyKeyHeader, replay, request_for
from app.config import Settings
from app.schemas.common import Page
from app.schemas.models import ModelRead
from app.services import models as model_service
from app.services.idempotency import save_response
from app.services.models import EXTENSIONS
from app.services.uploads import Upload, receive_upload
from app.storage import BlobStore

router = APIRouter(prefix="/v1/models", tags=["models"])

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "name": {"type": "string"},
                    },
                }
            }
        },
    }
}


@router.post("", status_code=201, response_model=ModelRead, openapi_extra=UPLOAD_BODY)
async def upload_model(
    request: Request,
    response: Response,
    team: CurrentTeam,
    storage: StorageDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Any:
    """Upload an ONNX, torch.export (.pt2) or TorchScript model; the worker inspects it next."""
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
    idem = request_for(idempotency_key, "POST /v1/models", upload.sha256, name)
    with open_session(settings) as session:
        replayed = replay(session, team_id, idem, lambda i: _read(session, team_id, i))
        if replayed is not None:
            return replayed, None
        model = model_service.create(session, storage, settings, team_id, upload, name, idem)
        body = ModelRead.model_validate(model)
        if idem is not None:
            save_response(session, team_id, idem, body.model_dump(mode="json"))
        return body, f"/v1/models/{model.id}"


def _read(session: SessionDep, team_id: str, model_id: str) -> dict[str, Any]:
    model = model_service.get_or_raise(session, team_id, model_id)
    return ModelRead.model_validate(model).model_dump(mode="json")


@router.get("", response_model=Page[ModelRead])
def list_models(team: CurrentTeam, session: SessionDep, page: PageDep) -> Page[ModelRead]:
    result = model_service.get_page(session, team.id, page.limit, page.cursor)
    return Page(
        items=[ModelRead.model_validate(m) for m in result.items], next_cursor=result.next_cursor
    )


@router.get("/{model_id}", response_model=ModelRead)
def get_model(model_id: str, team: CurrentTeam, session: SessionDep) -> ModelRead:
    return ModelRead.model_validate(model_service.get_or_raise(session, team.id, model_id))


@router.delete("/{model_id}", status_code=204)
def delete_model(
    model_id: str, team: CurrentTeam, session: SessionDep, storage: StorageDep
) -> Response:
    model_service.delete(session, storage, team.id, model_id)
    return Response(status_code=204)


@router.get("/{model_id}/download", response_class=Response)
def download_model(
    model_id: str, request: Request, team: CurrentTeam, session: SessionDep, storage: StorageDep
) -> Response:
    """The original upload, byte for byte (Range, ETag and sha256 headers)."""
    model = model_service.get_or_raise(session, team.id, model_id)
    return blob_response(
        request,
        storage,
        key=model.blob_key,
        size=model.size_bytes,
        sha256=model.sha256,
        filename=f"{model.name}.{EXTENSIONS[model.format]}",
    )
