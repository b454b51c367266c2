from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from app.api.deps import CurrentTeam, PageDep, SessionDep, SettingsDep, StorageDep
from app.api.downloads import blob_response
from app.api.idempotency import IdempotencyKeyHeader
from app.api.upload_flow import UploadKind, accept_upload
from app.schemas.common import Page
from app.schemas.models import ModelRead
from app.services import models as model_service
from app.services.models import EXTENSIONS

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


MODELS = UploadKind("/v1/models", model_service.create, model_service.get_or_raise, ModelRead)


@router.post("", status_code=201, response_model=ModelRead, openapi_extra=UPLOAD_BODY)
async def upload_model(
    request: Request,
    response: Response,
    team: CurrentTeam,
    storage: StorageDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Any:
    """Upload an ONNX or torch.export (.pt2) model; the worker inspects it next."""
    return await accept_upload(
        MODELS, request, response, team.id, storage, settings, idempotency_key
    )


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
