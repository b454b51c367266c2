from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from app.db.base import Base
from app.db.repositories.base import InvalidCursor, Page
from app.errors import Invalid

T = TypeVar("T", bound=Base)


def page_or_422(fetch: Callable[[], Page[T]]) -> Page[T]:
    try:
        return fetch()
    except InvalidCursor as exc:
        raise Invalid(
            "invalid_cursor",
            "The cursor is not one this API returned; pass next_cursor from the previous page.",
            field="cursor",
        ) from exc
