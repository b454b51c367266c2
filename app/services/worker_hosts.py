"""Record what sandbox protections each worker host has and when it was last alive; summarise
them for /readyz."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from app.config import Settings
from app.db.base import utcnow
from app.db.repositories.worker_hosts import WorkerHostRepository
from app.db.session import session_scope

RECENT = timedelta(days=1)


def record(settings: Settings, hostname: str, protections: dict[str, bool]) -> None:
    """Upsert the host's row with the protections its sandbox child reported at start."""
    with session_scope(settings.database_url) as session:
        WorkerHostRepository(session).upsert(hostname, dict(protections))


def touch(settings: Settings, hostname: str) -> bool:
    """Record that the host's worker is alive now (its heartbeat, /metrics
    compaas_worker_last_seen_timestamp_seconds); False when the host has no row yet."""
    with session_scope(settings.database_url) as session:
        return WorkerHostRepository(session).touch(hostname)


def recent(settings: Settings) -> list[dict[str, Any]]:
    """Hosts started or seen within a day, newest first, with their protections."""
    with session_scope(settings.database_url) as session:
        hosts = WorkerHostRepository(session).seen_since(utcnow() - RECENT)
        return [
            {
                "hostname": h.hostname,
                "protections": h.protections,
                "started_at": h.started_at.isoformat(),
                "seen_at": h.seen_at.isoformat(),
            }
            for h in hosts
        ]
