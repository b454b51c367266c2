from __future__ import annotations

from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, field_validator

from app.redact import relative_paths

T = TypeVar("T")


class ReadModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class Page(BaseModel, Generic[T]):
    """A page of a cursor-paginated list; pass next_cursor back as ?cursor= for the next."""

    items: list[T]
    next_cursor: str | None


class ErrorInfo(BaseModel):
    code: str
    detail: str
    field: str | None = None

    @field_validator("detail")
    @classmethod
    def _no_absolute_paths(cls, detail: str) -> str:
        return relative_paths(detail)

    @classmethod
    def maybe(cls, value: dict[str, Any] | None) -> ErrorInfo | None:
        return cls.model_validate(value) if value else None
