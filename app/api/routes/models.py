from __future__ import annotations

from fastapi import Request, Response

from app.api.deps import CurrentTeam, SessionDep, StorageDep
from app.api.downloads import blob_response
from app.api.uploaded import uploaded_router
from app.schemas.models import ModelRead
from app.services import uploaded
from app.services.models import EXTENSIONS, MODELS

router = uploaded_router(
    MODELS, ModelRead, "Upload an ONNX or torch.export (.pt2) model; the worker inspects it next."
)


@router.get("/{model_id}/download", response_class=Response)
def download_model(
    model_id: str, request: Request, team: CurrentTeam, session: SessionDep, storage: StorageDep
) -> Response:
    """The original upload, byte for byte (Range, ETag and sha256 headers)."""
    model = uploaded.get_or_raise(session, MODELS, team.id, model_id)
    return blob_response(request, storage, model, f"{model.name}.{EXTENSIONS[model.format]}")
