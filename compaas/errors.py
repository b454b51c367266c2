"""What the SDK raises: API refusals (problem+json), network failures, bad uploads, bad bytes."""

from __future__ import annotations

from typing import Any


class CompaasError(Exception):
    """Base of every error the SDK raises."""


class ApiError(CompaasError):
    """The API answered with an error: its problem+json (RFC 9457) as status, code and detail."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        self.code: str = str(problem.get("code") or f"http_{status}")
        self.detail: str = str(problem.get("detail") or problem.get("title") or "")
        self.field: str | None = problem.get("field")
        where = f" ({self.field})" if self.field else ""
        super().__init__(f"{status} {self.code}{where}: {self.detail}")


class NetworkError(CompaasError):
    """The API could not be reached, or kept failing, after every retry."""


class UploadInvalid(CompaasError):
    """The worker inspected an upload and refused it (`status: invalid`): its code and detail."""

    def __init__(self, kind: str, object_id: str, error: dict[str, Any] | None) -> None:
        self.object_id = object_id
        self.code: str = str((error or {}).get("code") or "invalid")
        self.detail: str = str((error or {}).get("detail") or "")
        super().__init__(f"{kind} {object_id} is invalid: {self.code}: {self.detail}")


class ChecksumMismatch(CompaasError):
    """A downloaded file's sha256 is not the one the API lists for it (the file is removed)."""


class WaitTimeout(CompaasError):
    """A wait ran past its timeout; the job or upload is still in progress on the server."""
