from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, IdMixin, utcnow


class UiSession(IdMixin, Base):
    """A dashboard sign-in (issue #16): the browser holds a random token in an HttpOnly cookie;
    only its keyed hash is stored, like an API key's. It lives as long as the key it was made
    from: a revoked or expired key ends its sessions."""

    __tablename__ = "ui_sessions"

    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    api_key_id: Mapped[str] = mapped_column(
        ForeignKey("api_keys.id", ondelete="CASCADE"), index=True
    )
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
