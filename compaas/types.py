"""The API's own pydantic schemas (app/schemas: pydantic only), and the events of a job."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.schemas.common import ErrorInfo, Page
from app.schemas.datasets import DatasetRead
from app.schemas.jobs import ArtifactRead, JobCreate, JobRead, JobStatusRead, JobStepRead
from app.schemas.models import ModelRead

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})

__all__ = [
    "TERMINAL_STATUSES",
    "ArtifactRead",
    "DatasetRead",
    "ErrorInfo",
    "JobCreate",
    "JobEvent",
    "JobRead",
    "JobStatusRead",
    "JobStepRead",
    "ModelRead",
    "Page",
]


@dataclass(frozen=True)
class JobEvent:
    """One Server-Sent Event of GET /v1/jobs/{id}/events.

    `type` is `status` (status, …), `step` (index, status, metrics when it finished),
    `progress` (progress 0..1, message), `log` (level, message) or `done` (status, the last).
    """

    id: int
    type: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.type == "done"
