from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, IdMixin, TimestampMixin


class ModelStatus(enum.StrEnum):
    pending = "pending"
    ready = "ready"
    invalid = "invalid"


class Model(IdMixin, TimestampMixin, Base):
    """An uploaded model file; the worker inspects it and fills inputs/outputs/params."""

    __tablename__ = "models"

    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20), default=ModelStatus.pending)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    blob_key: Mapped[str] = mapped_column(String(500))
    inputs: Mapped[list[Any] | None] = mapped_column(default=None)
    outputs: Mapped[list[Any] | None] = mapped_column(default=None)
    params: Mapped[int | None] = mapped_column(BigInteger, default=None)
    opset: Mapped[int | None] = mapped_column(default=None)
    error: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    # When the inspection message was last known in the broker (published, or seen there by
    # the reconciler; None: not published yet) and how many times it was published
    # (app.services.publishing).
    published_at: Mapped[datetime | None] = mapped_column(default=None)
    publish_count: Mapped[int] = mapped_column(default=0, server_default="0")
