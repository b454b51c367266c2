from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy.orm import Session

from app.api.deps import CurrentTeam, PageDep, SessionDep, SettingsDep, StorageDep
from app.api.idempotency import IdempotencyKeyHeader
from app.api.routes.models import UPLOAD_BODY
from app.api.upload_flow import UploadKind, accept_upload
from app.config import Settings
from app.db.models import Dataset
from app.schemas.common import Page
from app.schemas.datasets import DatasetRead
from app.services import datasets as dataset_service
from app.services.idempotency import IdempotentRequest
from app.services.uploads import Upload
from app.storage import BlobStore

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


def _create(
    session: Session,
    storage: BlobStore,
    _settings: Settings,
    team_id: str,
    upload: Upload,
    name: str | None,
    idem: IdempotentRequest | None,
) -> Dataset:
    return dataset_service.create(session, storage, team_id, upload, name, idem)


DATASETS = UploadKind("/v1/datasets", _create, dataset_service.get_or_raise, DatasetRead)


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
    return await accept_upload(
        DATASETS, request, response, team.id, storage, settings, idempotency_key
    )


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
