"""Queries for operators, across teams: is the database there, how many rows by status."""

from __future__ import annotations

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from app.db.models import Job, Model


class OperationsRepository:
    """Counts over every team (/metrics) and a liveness query (/readyz)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def ping(self) -> None:
        """Raise if the database does not answer."""
        self.session.execute(text("SELECT 1"))

    def jobs_by_status(self) -> dict[str, int]:
        rows = self.session.execute(select(Job.status, func.count()).group_by(Job.status))
        return {status: count for status, count in rows.tuples()}

    def models_by_status(self) -> dict[str, int]:
        rows = self.session.execute(select(Model.status, func.count()).group_by(Model.status))
        return {status: count for status, count in rows.tuples()}
