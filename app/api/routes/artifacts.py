from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.api.deps import CurrentTeam, SessionDep, StorageDep
from app.api.downloads import blob_response
from app.schemas.jobs import ArtifactRead
from app.services import jobs as job_service

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
    stem = f"{artifact.job_id[:8]}-{artifact.role}"
    if artifact.step_index is not None and artifact.role == "checkpoint":
        stem += f"-step{artifact.step_index}"
    return blob_response(request, storage, artifact, f"{stem}.{artifact.format}")
