"""Domain errors the services raise: a stable code, a detail that says what to do, no web types.

The kind of refusal is the class; `app/api/problems.py` maps each kind to its HTTP status and
renders it as RFC 9457 problem+json. `retry_after` (seconds) says when trying again can help.
"""

from __future__ import annotations

from typing import Any


class AppError(Exception):
    """A refusal the client can act on; subclasses say which kind."""

    def __init__(
        self,
        code: str,
        detail: str,
        *,
        field: str | None = None,
        retry_after: int | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.field = field
        self.retry_after = retry_after
        self.extra = extra


class Invalid(AppError):
    """The request is well formed but cannot be accepted as it is (fix it and send it again)."""


class NotFound(AppError):
    """No such object in the caller's team."""


class Conflict(AppError):
    """The object's current state does not allow this (wait, or change the state first)."""


class LimitReached(AppError):
    """The team is at a quota; wait for some of its work to finish."""


class Unavailable(AppError):
    """The deployment is not set up for this (an operator must configure it)."""


# Where a kind is listed, when not at GET /v1/{kind}s (artifacts are listed on their job).
LISTED_AT = {"artifact": "a job's `artifacts` at GET /v1/jobs/{job_id} (jobs: GET /v1/jobs)"}


def not_found(kind: str, object_id: str) -> NotFound:
    listed = LISTED_AT.get(kind, f"yours with GET /v1/{kind}s")
    return NotFound("not_found", f"No {kind} with id {object_id!r} in your team. List {listed}.")
