from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, IdMixin, TimestampMixin


class Team(IdMixin, TimestampMixin, Base):
    """A tenant: every model, dataset, job and artifact belongs to exactly one team."""

    __tablename__ = "teams"

    name: Mapped[str] = mapped_column(String(200))


class ApiKey(IdMixin, TimestampMixin, Base):
    """An API key; only its keyed hash is stored, the key itself is shown once."""

    __tablename__ = "api_keys"

    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
