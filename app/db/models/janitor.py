"""What the janitor remembers between passes: orphan blob candidates and what it reclaimed."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, utcnow


class OrphanBlob(Base):
    """A blob the janitor listed with no row pointing at it; deleted on a later pass once it
    has stayed without a row for the grace period (COMPAAS_ORPHAN_BLOB_GRACE_S)."""

    __tablename__ = "orphan_blobs"

    key: Mapped[str] = mapped_column(String(500), primary_key=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    first_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)


class JanitorReclaimed(Base):
    """Running totals of what the janitor removed, by kind (the /metrics counters)."""

    __tablename__ = "janitor_reclaimed"

    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    files: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
