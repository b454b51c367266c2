"""The routes models and datasets share: upload (streamed, stored off the event loop), list,
get and delete. Built per kind, so both collections behave the same and keep their own names.
"""

# No `from __future__ import annotations`: the routes in uploaded_router are annotated with a
# value made for each kind (its id path parameter), so their annotations must be evaluated.

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from app.api.deps import CurrentTeam, PageDep, SessionDep, SettingsDep, StorageDep, open_session
from app.api.idempotency import IdempotencyKeyHeader, replay, request_for
from app.api.multipart import receive_upload
from app.config import Settings
from app.schemas.common import Page
from app.services import uploaded
from app.services.idempotency import save_response
from app.services.spool import Upload
from app.services.uploaded import UploadedKind
from app.storage import BlobStore

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


@dataclass(frozen=True)
class UploadRequest:
    """An upload route's request and what it needs (no DB session: it is opened after the body)."""

    request: Request
    response: Response
    team_id: str
    storage: BlobStore
    settings: Settings
    idempotency_key: str | None

    async def accept(self, kind: UploadedKind[Any], schema: type[BaseModel]) -> Any:
        """Receive the body, then sniff, store and record it; set Location on a new row."""
        settings = self.settings
        upload = await receive_upload(
            self.request,
            settings.tmp_dir,
            settings.max_upload_bytes,
            idle_timeout_s=settings.upload_idle_timeout_s,
            deadline_s=settings.upload_deadline_s,
        )
        try:
            body, location = await run_in_threadpool(self._store, kind, schema, upload)
        finally:
            upload.discard()
        if location:
            self.response.headers["Location"] = location
        return body

    def _store(
        self, kind: UploadedKind[Any], schema: type[BaseModel], upload: Upload
    ) -> tuple[Any, str | None]:
        """Sniff, store and record the upload (blocking work, run in a worker thread)."""
        name = upload.fields.get("name")
        idem = request_for(self.idempotency_key, f"POST {kind.collection}", upload.sha256, name)
        with open_session(self.settings) as session:

            def read(row_id: str) -> dict[str, Any]:
                row = uploaded.get_or_raise(session, kind, self.team_id, row_id)
                return schema.model_validate(row).model_dump(mode="json")

            replayed = replay(session, self.team_id, idem, read)
            if replayed is not None:
                return replayed, None
            row = uploaded.create(
                session, self.storage, self.settings, kind, self.team_id, upload, name, idem
            )
            body = schema.model_validate(row)
            if idem is not None:
                save_response(session, self.team_id, idem, body.model_dump(mode="json"))
            return body, f"{kind.collection}/{row.id}"


async def _upload_request(
    request: Request,
    response: Response,
    team: CurrentTeam,
    storage: StorageDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> UploadRequest:
    return UploadRequest(request, response, team.id, storage, settings, idempotency_key)


UploadRequestDep = Annotated[UploadRequest, Depends(_upload_request)]


def _path_id(name: str) -> Callable[..., str]:
    """A dependency that reads the path parameter `name` (e.g. model_id) as it is documented."""

    def path_id(**path: str) -> str:
        return path[name]

    parameter = inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=str)
    path_id.__signature__ = inspect.Signature([parameter])  # type: ignore[attr-defined]
    return path_id


def uploaded_router(kind: UploadedKind[Any], schema: type[BaseModel], upload_doc: str) -> APIRouter:
    """A router at /v1/{kind}s with upload, list, get and delete (operation names as before)."""
    router = APIRouter(prefix=kind.collection, tags=[f"{kind.name}s"])
    ObjectId = Annotated[str, Depends(_path_id(f"{kind.name}_id"))]  # noqa: N806
    by_id = f"/{{{kind.name}_id}}"

    async def upload(upload: UploadRequestDep) -> Any:
        return await upload.accept(kind, schema)

    def list_page(team: CurrentTeam, session: SessionDep, page: PageDep) -> Any:
        rows = uploaded.get_page(session, kind, team.id, page.limit, page.cursor)
        items = [schema.model_validate(row) for row in rows.items]
        return Page[Any](items=items, next_cursor=rows.next_cursor)

    def get(object_id: ObjectId, team: CurrentTeam, session: SessionDep) -> Any:
        return schema.model_validate(uploaded.get_or_raise(session, kind, team.id, object_id))

    def delete(
        object_id: ObjectId, team: CurrentTeam, session: SessionDep, storage: StorageDep
    ) -> Response:
        uploaded.delete(session, storage, kind, team.id, object_id)
        return Response(status_code=204)

    router.add_api_route(
        "",
        upload,
        methods=["POST"],
        status_code=201,
        response_model=schema,
        openapi_extra=UPLOAD_BODY,
        name=f"upload_{kind.name}",
        description=upload_doc,
    )
    page_schema = Page[schema]  # type: ignore[valid-type]
    router.add_api_route(
        "", list_page, methods=["GET"], response_model=page_schema, name=f"list_{kind.name}s"
    )
    router.add_api_route(
        by_id, get, methods=["GET"], response_model=schema, name=f"get_{kind.name}"
    )
    router.add_api_route(
        by_id, delete, methods=["DELETE"], status_code=204, name=f"delete_{kind.name}"
    )
    return router
