from __future__ import annotations

from sqlalchemy import BigInteger, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, IdMixin, TimestampMixin


class Artifact(IdMixin, TimestampMixin, Base):
    """A file a job produced: a step's checkpoint or the final edge-ready export."""

    __tablename__ = "artifacts"

    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step_index: Mapped[int | None] = mapped_column(default=None)
    role: Mapped[str] = mapped_column(String(20))
    format: Mapped[str] = mapped_column(String(20))
    blob_key: Mapped[str] = mapped_column(String(500))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    # The quality verdict of the model in the file: ok, degraded (accepted under the floor) or
    # rejected (under the floor: kept downloadable, not to be shipped); None before 0005.
    verdict: Mapped[str | None] = mapped_column(String(20), default=None)
