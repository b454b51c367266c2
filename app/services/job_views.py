"""The job as pollers read it: the status view, and a version of each view for ETags.

A view's version is a hash that changes whenever its document can: the status view's, of its
own five fields; the whole document's, of the columns every part of it is kept in step with
(VERSION_COLUMNS), so that a conditional read answers from one narrow row without building the
document. Both are computed the same way from the loaded document (what a 200 sends) and from
the database (what a conditional read compares).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy.orm import Session

from app.db.models import Artifact, Job
from app.db.repositories import TeamJobRepository
from app.errors import not_found
from app.schemas.jobs import JobRead, JobStatusRead
from app.services import jobs as job_service
from engine.recipe import library_versions

# Bumped when JobRead's shape changes, so that clients' stored tags stop matching.
DOCUMENT_REVISION = "1"
# What the whole document is made of and the column that moves with each part:
VERSION_COLUMNS = (
    "job.updated_at",  # every write to the job row sets it (the ORM's onupdate)
    "job.model_id",  # set to NULL by the database when the model is deleted
    "job.dataset_id",  # likewise for the dataset
    "max(step.updated_at)",  # every step write sets it
    "count(step.artifact_id)",  # a checkpoint's artifact deleted: set to NULL by the database
    "count(artifact)",  # artifacts added or deleted
    "max(artifact.id)",
    "max(artifact.updated_at)",
)


@lru_cache(maxsize=1)
def _representation() -> str:
    """The document's revision and this API's library versions (a recipe job's warnings
    compare with them until a worker claimed it)."""
    return DOCUMENT_REVISION + json.dumps(library_versions(), sort_keys=True)


def _digest(*parts: Any) -> str:
    text = json.dumps([_plain(p) for p in parts], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _latest(values: Sequence[datetime | None]) -> datetime | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def document_version(job: Job, artifacts: list[Artifact]) -> str:
    """The version of the document built from this job (its steps loaded) and artifacts."""
    return _digest(
        _representation(),
        job.id,
        job.updated_at,
        job.model_id,
        job.dataset_id,
        _latest([s.updated_at for s in job.steps]),
        sum(1 for s in job.steps if s.artifact_id is not None),
        len(artifacts),
        max((a.id for a in artifacts), default=None),
        _latest([a.updated_at for a in artifacts]),
    )


def stored_document_version(session: Session, team_id: str, job_id: str) -> str:
    """The version of the job's document as stored now, from one narrow row (404 if the team
    has no such job)."""
    row = TeamJobRepository(session, team_id).version_row(job_id)
    if row is None:
        raise not_found("job", job_id)
    return _digest(_representation(), job_id, *row)


def read(session: Session, team_id: str, job_id: str) -> tuple[JobRead, str]:
    """The whole document and its version."""
    job = job_service.get_or_raise(session, team_id, job_id)
    artifacts = TeamJobRepository(session, team_id).artifacts_of([job.id])[job.id]
    return job_service.to_read(job, artifacts), document_version(job, artifacts)


def read_status(session: Session, team_id: str, job_id: str) -> tuple[JobStatusRead, str]:
    """The status view and its version, from one row."""
    row = TeamJobRepository(session, team_id).status_row(job_id)
    if row is None:
        raise not_found("job", job_id)
    view = JobStatusRead(
        id=row.id,
        status=row.status,
        progress=row.progress,
        current_step=row.current_step,
        updated_at=row.updated_at,
    )
    return view, _digest("status", *row)
