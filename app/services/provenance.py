"""Provenance of an artifact: its in-toto statement (engine.provenance), made when asked from
the job's recipe and the artifact's recorded sha256, signed with the deployment's key."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.config import Settings
from app.db.models import Artifact
from app.db.repositories import TeamJobRepository, TeamRepository
from app.errors import not_found
from app.services.artifact_names import download_name
from app.services.recipes import recipe_of
from app.signing import signing_key
from engine.provenance import sign_envelope, statement


def signed_statement(
    session: Session, settings: Settings, team_id: str, artifact_id: str
) -> dict[str, Any]:
    """The artifact's in-toto statement in a DSSE envelope signed with the deployment's key."""
    artifact = TeamRepository(session, Artifact, team_id).get(artifact_id)
    if artifact is None:
        raise not_found("artifact", artifact_id)
    job = TeamJobRepository(session, team_id).get_with_steps(artifact.job_id)
    if job is None:  # pragma: no cover - an artifact's job is deleted with it
        raise not_found("artifact", artifact_id)
    document = statement(
        subject_name=download_name(session, team_id, artifact),
        subject_sha256=artifact.sha256,
        recipe=recipe_of(session, job),
        job={
            "id": job.id,
            "artifact_id": artifact.id,
            "role": artifact.role,
            "step_index": artifact.step_index,
            "started_on": job.started_at.isoformat() if job.started_at else None,
            "finished_on": job.finished_at.isoformat() if job.finished_at else None,
        },
    )
    return sign_envelope(document, signing_key(settings))
