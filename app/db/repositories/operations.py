"""Queries for operators, across teams: is the database there, how many rows by status, how
long finished jobs and steps took, sandbox kills, worker hosts' last heartbeat."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Float, case, cast, func, literal, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from app.db.models import (
    Job,
    JobStep,
    Model,
    SandboxKill,
    StepStatus,
    WorkerHost,
)
from app.db.models.job import TERMINAL_STATUSES


@dataclass
class Buckets:
    """One histogram series computed from rows: cumulative counts per upper bound, the sum and
    the count of the observations (seconds)."""

    cumulative: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def plus(self, other: Buckets) -> Buckets:
        """Both sets of observations together (same bounds)."""
        if not self.cumulative:
            return other
        if not other.cumulative:
            return self
        cumulative = [a + b for a, b in zip(self.cumulative, other.cumulative, strict=True)]
        return Buckets(cumulative, self.total + other.total, self.count + other.count)


@dataclass
class Window:
    """Which rows a duration histogram reads: those whose observation time (finished_at; a
    claim's started_at) is in [since, until), None for open ends; and the buckets' bounds."""

    bounds: Sequence[float]
    since: datetime | None = None
    until: datetime | None = None


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

    # ------------------------------------------------------------------------- durations

    def _seconds(self, start: Any, end: Any) -> Any:
        """end - start in seconds, in this database's dialect."""
        if self.session.get_bind().dialect.name == "postgresql":
            return func.extract("epoch", end - start)
        return (func.julianday(end) - func.julianday(start)) * literal(86400.0)

    def _histogram(
        self,
        labels: Sequence[Any],
        start: Any,
        end: Any,
        where: Sequence[ColumnElement[bool]],
        window: Window,
    ) -> dict[tuple[str, ...], Buckets]:
        """One aggregate query over the rows whose `end` falls in the window: per label values,
        how many durations fall at or under each bound, their sum and count (rows without both
        timestamps are left out)."""
        seconds = cast(self._seconds(start, end), Float)
        columns = [func.sum(case((seconds <= bound, 1), else_=0)) for bound in window.bounds]
        conditions = [start.is_not(None), end.is_not(None), *where]
        if window.since is not None:
            conditions.append(end >= window.since)
        if window.until is not None:
            conditions.append(end < window.until)
        query = (
            select(*labels, func.count(), func.coalesce(func.sum(seconds), 0.0), *columns)
            .where(*conditions)
            .group_by(*labels)
        )
        found: dict[tuple[str, ...], Buckets] = {}
        width = len(labels)
        for row in self.session.execute(query):
            key = tuple(str(v) for v in row[:width])
            count, total = int(row[width]), float(row[width + 1])
            found[key] = Buckets([int(c or 0) for c in row[width + 2 :]], max(total, 0.0), count)
        return found

    def job_durations(self, window: Window) -> dict[tuple[str, ...], Buckets]:
        """Jobs that finished (succeeded, failed, canceled) in the window, by status: last
        claim to finish."""
        return self._histogram(
            [Job.status],
            Job.started_at,
            Job.finished_at,
            [Job.status.in_(TERMINAL_STATUSES)],
            window,
        )

    def job_queue_waits(self, window: Window) -> dict[tuple[str, ...], Buckets]:
        """Jobs a worker claimed in the window: created to (last) claim."""
        return self._histogram([], Job.created_at, Job.started_at, [], window)

    def step_durations(self, window: Window) -> dict[tuple[str, ...], Buckets]:
        """Steps that finished (succeeded, failed) in the window, by op and status: started
        to finished."""
        return self._histogram(
            [JobStep.op, JobStep.status],
            JobStep.started_at,
            JobStep.finished_at,
            [JobStep.status.in_((StepStatus.succeeded, StepStatus.failed))],
            window,
        )

    # ------------------------------------------------------------------------- sandbox kills

    def add_sandbox_kill(self, reason: str, now: datetime) -> None:
        """Count one sandbox child stopped for `reason` (one atomic upsert)."""
        dialect = self.session.get_bind().dialect.name
        insert = pg_insert if dialect == "postgresql" else sqlite_insert
        statement = insert(SandboxKill).values(reason=reason, count=1, last_at=now)
        statement = statement.on_conflict_do_update(
            index_elements=[SandboxKill.reason],
            set_={"count": SandboxKill.__table__.c.count + 1, "last_at": now},
        )
        self.session.execute(statement)

    def sandbox_kills(self) -> dict[str, int]:
        rows = self.session.execute(select(SandboxKill.reason, SandboxKill.count))
        return {reason: int(count) for reason, count in rows.tuples()}

    # ------------------------------------------------------------------------- worker hosts

    def worker_hosts(self, since: datetime) -> list[tuple[str, datetime, datetime]]:
        """(hostname, started_at, seen_at) of the hosts seen since `since`."""
        rows = self.session.execute(
            select(WorkerHost.hostname, WorkerHost.started_at, WorkerHost.seen_at).where(
                WorkerHost.seen_at >= since
            )
        )
        return [(h, started, seen) for h, started, seen in rows.tuples()]
