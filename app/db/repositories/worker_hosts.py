"""Worker hosts and the sandbox protections each found active at start (operator data)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import WorkerHost


class WorkerHostRepository:
    """One row per hostname; a restart replaces its protections."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def upsert(self, hostname: str, protections: dict[str, Any]) -> WorkerHost:
        now = utcnow()
        host = self.session.get(WorkerHost, hostname)
        if host is None:
            host = WorkerHost(hostname=hostname, protections=protections, started_at=now)
            self.session.add(host)
        host.protections = protections
        host.started_at = now
        host.seen_at = now
        self.session.flush()
        return host

    def touch(self, hostname: str) -> bool:
        """The host is alive now (its heartbeat); False when it has no row yet."""
        host = self.session.get(WorkerHost, hostname)
        if host is None:
            return False
        host.seen_at = utcnow()
        self.session.flush()
        return True

    def seen_since(self, since: datetime, limit: int = 50) -> Sequence[WorkerHost]:
        stmt = (
            select(WorkerHost)
            .where(WorkerHost.seen_at >= since)
            .order_by(WorkerHost.seen_at.desc())
            .limit(limit)
        )
        return self.session.scalars(stmt).all()
