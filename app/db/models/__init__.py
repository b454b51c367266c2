"""ORM models: one module per domain, all imported here for Alembic and the mappers."""

from app.db.models.artifact import Artifact
from app.db.models.dataset import Dataset
from app.db.models.event import JobEvent
from app.db.models.idempotency import IdempotencyKey
from app.db.models.janitor import JanitorReclaimed, OrphanBlob
from app.db.models.job import Job, JobStatus, JobStep, StepStatus
from app.db.models.model import Model, ModelStatus
from app.db.models.sandbox_kill import SandboxKill
from app.db.models.team import ApiKey, Team
from app.db.models.ui_session import UiSession
from app.db.models.worker_host import WorkerHost

__all__ = [
    "ApiKey",
    "Artifact",
    "Dataset",
    "IdempotencyKey",
    "JanitorReclaimed",
    "Job",
    "JobEvent",
    "JobStatus",
    "JobStep",
    "Model",
    "ModelStatus",
    "OrphanBlob",
    "SandboxKill",
    "StepStatus",
    "Team",
    "UiSession",
    "WorkerHost",
]
