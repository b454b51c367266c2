"""The file name an artifact is downloaded as (and named in its provenance statement):
`<model-name>-<job-short-id>-<step>-<op>.<ext>`, unique among a job's artifacts."""

from __future__ import annotations

import re
import unicodedata

from sqlalchemy.orm import Session

from app.db.models import Artifact
from app.db.repositories import TeamJobRepository

# Runs of path separators, characters Windows refuses, control characters and whitespace.
_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|\s_]+')
MAX_STEM = 80


def short_id(object_id: str) -> str:
    """The last 8 hex digits of a UUIDv7: its random part (the first 8 are a time prefix,
    shared by every job created in the same minute)."""
    return object_id.replace("-", "")[-8:]


def safe_stem(name: str | None, fallback: str = "model") -> str:
    """A user's name as a file-name part: NFC, no separators or control characters, no spaces,
    at most MAX_STEM characters (non-ASCII kept; RFC 6266's filename* carries it)."""
    text = unicodedata.normalize("NFC", name or "")
    text = _UNSAFE.sub("_", text).strip("._-")
    return text[:MAX_STEM] or fallback


def artifact_filename(artifact: Artifact, model_name: str | None, ops: list[str]) -> str:
    """`digits-5f3c9a1e-step0-prune.pt2` for a checkpoint, `digits-5f3c9a1e-final-weight_share.cpz`
    for a deliverable (the last step's op; the extension tells a job's final files apart)."""
    if artifact.role == "checkpoint" and artifact.step_index is not None:
        step = f"step{artifact.step_index}"
        index = artifact.step_index
    else:
        step, index = "final", len(ops) - 1
    op = ops[index] if 0 <= index < len(ops) else "original"
    return f"{safe_stem(model_name)}-{short_id(artifact.job_id)}-{step}-{op}.{artifact.format}"


def download_name(session: Session, team_id: str, artifact: Artifact) -> str:
    """The artifact's file name, from its job's model name and steps."""
    model_name, ops = TeamJobRepository(session, team_id).naming(artifact.job_id)
    return artifact_filename(artifact, model_name, ops)
