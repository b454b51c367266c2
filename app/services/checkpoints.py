"""Where a job resumes: the last stored step checkpoint that is still valid.

A job keeps one checkpoint per (job, step): each finished step's output, stored by the attempt
that ran it while it owned the job. Cancel and retry keep them (so a retried job does not redo
finished steps); they go when the job does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.db.models import Artifact, Job, StepStatus

CHECKPOINT = "checkpoint"


@dataclass(frozen=True)
class ResumePoint:
    """Continue at `start_index` from the checkpoint `artifact` of the step before it."""

    start_index: int
    artifact: Artifact


def resume_point(
    session: Session, job: Job, blob_exists: Callable[[str], bool] | None = None
) -> ResumePoint | None:
    """The latest valid checkpoint of the job's leading run of finished steps, or None (start
    at step 0).

    Valid: its step succeeded, as did every step before it; it is not the last step (that one's
    output is the final artifact); its artifact row is this job's checkpoint of that step; and,
    when `blob_exists` is given, its file is still in the blob store. A checkpoint that fails
    any of these is skipped for the one before it. Resuming also needs the original model's
    metrics, which the first attempt recorded.
    """
    if not (job.metrics or {}).get("original"):
        return None
    leading = []
    for step in job.steps:
        if step.status != StepStatus.succeeded or not step.artifact_id:
            break
        leading.append(step)
    for step in reversed(leading):
        if step.index + 1 >= len(job.steps):
            continue
        artifact = session.get(Artifact, step.artifact_id)
        if (
            artifact is None
            or artifact.job_id != job.id
            or artifact.role != CHECKPOINT
            or artifact.step_index != step.index
        ):
            continue
        if blob_exists is not None and not blob_exists(artifact.blob_key):
            continue
        return ResumePoint(step.index + 1, artifact)
    return None
