from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, utcnow


class WorkerHost(Base):
    """A worker host and the sandbox protections it found active when it last started."""

    __tablename__ = "worker_hosts"

    hostname: Mapped[str] = mapped_column(String(255), primary_key=True)
    protections: Mapped[dict[str, Any]]
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow)
