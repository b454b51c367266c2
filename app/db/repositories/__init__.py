"""Every query lives here, and every query on team-owned rows is scoped to one team."""

from app.db.repositories.base import Page, TeamRepository
from app.db.repositories.jobs import JobRepository, TeamJobRepository
from app.db.repositories.models import ModelInspectionRepository
from app.db.repositories.teams import TeamAdminRepository

__all__ = [
    "JobRepository",
    "ModelInspectionRepository",
    "Page",
    "TeamAdminRepository",
    "TeamJobRepository",
    "TeamRepository",
]
