from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from app.api.deps import CurrentTeam, SessionDep, SettingsDep, StorageDep
from app.api.downloads import blob_response
from app.schemas.jobs import ArtifactRead
from app.services import jobs as job_service
from app.services import provenance
from app.services.artifact_names import download_name

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])


@router.get("/{artifact_id}", response_model=ArtifactRead)
def get_artifact(artifact_id: str, team: CurrentTeam, session: SessionDep) -> ArtifactRead:
    return ArtifactRead.model_validate(
        job_service.get_artifact_or_raise(session, team.id, artifact_id)
    )


@router.get("/{artifact_id}/download", response_class=Response)
def download_artifact(
    artifact_id: str,
    request: Request,
    team: CurrentTeam,
    session: SessionDep,
    storage: StorageDep,
) -> Response:
    """Stream the artifact (Range, ETag, Digest and X-Checksum-SHA256 headers)."""
    artifact = job_service.get_artifact_or_raise(session, team.id, artifact_id)
    return blob_response(request, storage, artifact, download_name(session, team.id, artifact))


@router.get("/{artifact_id}/provenance")
def artifact_provenance(
    artifact_id: str, team: CurrentTeam, session: SessionDep, settings: SettingsDep
) -> dict[str, Any]:
    """The artifact's in-toto provenance statement (subject sha256, recipe, materials) in a
    DSSE envelope signed with the deployment's ed25519 key; check it with `compaas verify`."""
    return provenance.signed_statement(session, settings, team.id, artifact_id)
