from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from app.db.base import Base

T = TypeVar("T", bound=Base)


class InvalidCursor(ValueError):
    """The cursor was not produced by this API."""


def encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except ValueError as exc:  # binascii.Error, UnicodeDecodeError, non-ASCII input
        raise InvalidCursor(cursor) from exc
    if len(raw) != 36:
        raise InvalidCursor(cursor)
    return raw


@dataclass
class Page(Generic[T]):
    items: Sequence[T]
    next_cursor: str | None


class TeamRepository(Generic[T]):
    """CRUD for one team-owned model class; the team id is part of every query."""

    def __init__(self, session: Session, model: type[T], team_id: str) -> None:
        self.session = session
        self.model = model
        self.team_id = team_id

    def _scoped(self) -> Select[Any]:
        return select(self.model).where(self.model.team_id == self.team_id)  # type: ignore[attr-defined]

    def get(self, object_id: str) -> T | None:
        stmt = self._scoped().where(self.model.id == object_id)  # type: ignore[attr-defined]
        return cast(T | None, self.session.scalars(stmt).first())

    def latest_by(self, **filters: Any) -> T | None:
        """The team's newest row whose columns equal `filters` (e.g. sha256=...)."""
        stmt = self._scoped()
        for name, value in filters.items():
            stmt = stmt.where(getattr(self.model, name) == value)
        stmt = stmt.order_by(self.model.id.desc())  # type: ignore[attr-defined]
        return cast(T | None, self.session.scalars(stmt).first())

    def create(self, **values: Any) -> T:
        obj = self.model(team_id=self.team_id, **values)
        self.session.add(obj)
        self.session.flush()
        return obj

    def delete(self, obj: T) -> None:
        self.session.delete(obj)
        self.session.flush()

    def get_page(self, limit: int, cursor: str | None, **filters: Any) -> Page[T]:
        stmt = self._scoped()
        for name, value in filters.items():
            if value is not None:
                stmt = stmt.where(getattr(self.model, name) == value)
        id_col = self.model.id  # type: ignore[attr-defined]
        if cursor:
            stmt = stmt.where(id_col < decode_cursor(cursor))
        rows = cast(
            Sequence[T], self.session.scalars(stmt.order_by(id_col.desc()).limit(limit + 1)).all()
        )
        more = len(rows) > limit
        items = rows[:limit]
        return Page(items, encode_cursor(items[-1].id) if more else None)  # type: ignore[attr-defined]
