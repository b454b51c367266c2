"""Running totals of sandbox children stopped by a limit or a signal, by reason (/metrics)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, utcnow


class SandboxKill(Base):
    """How many sandbox children ended for this reason (memory, time, cpu_time, file_size,
    seccomp, signal, aborted), across every worker, since the database was created."""

    __tablename__ = "sandbox_kills"

    reason: Mapped[str] = mapped_column(String(32), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, default=0)
    last_at: Mapped[datetime] = mapped_column(default=utcnow)
