"""What the sync and async clients share: retry policy, error mapping, file names, bodies."""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
from tenacity import RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_exponential_jitter

from compaas.errors import ApiError, ChecksumMismatch, CompaasError, NetworkError
from compaas.types import ArtifactRead, JobCreate

# statuses that mean "not processed, try again": rate limited, gateway and overload answers
RETRY_STATUSES = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """How often a request is tried (in all) and how long to wait between tries.

    Waits grow exponentially from `backoff_s` with jitter, capped at `max_backoff_s`; a
    `Retry-After` header is honoured up to the same cap.
    """

    attempts: int = 4
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0


class RetryableStatus(Exception):
    """An answer worth retrying (RETRY_STATUSES); becomes an ApiError after the last try."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


RETRYABLE = (httpx.TransportError, RetryableStatus)


def user_agent() -> str:
    try:
        version = metadata.version("compaas")
    except metadata.PackageNotFoundError:
        version = "0"
    return f"compaas-sdk/{version} httpx/{httpx.__version__}"


def new_idempotency_key() -> str:
    return f"compaas-sdk-{uuid.uuid4()}"


def retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        from datetime import UTC, datetime

        return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


def retry_options(policy: RetryPolicy) -> dict[str, Any]:
    """Keyword arguments for tenacity's Retrying / AsyncRetrying."""
    backoff = wait_exponential_jitter(initial=policy.backoff_s, max=policy.max_backoff_s)

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, RetryableStatus):
            after = retry_after_s(exc.response)
            if after is not None:
                return min(after, policy.max_backoff_s)
        return float(backoff(state))

    return {
        "stop": stop_after_attempt(max(1, policy.attempts)),
        "wait": wait,
        "retry": retry_if_exception_type(RETRYABLE),
        "reraise": True,
    }


def backoff_s(policy: RetryPolicy, failures: int) -> float:
    return float(min(policy.max_backoff_s, policy.backoff_s * 2 ** max(0, failures - 1)))


def api_error(response: httpx.Response) -> ApiError:
    """The problem+json of an error answer (the body must have been read)."""
    problem: dict[str, Any]
    try:
        body = response.json()
        problem = body if isinstance(body, dict) else {"detail": str(body)}
    except ValueError:
        text = response.text.strip()[:500]
        problem = {"detail": text or response.reason_phrase}
    problem.setdefault("status", response.status_code)
    return ApiError(response.status_code, problem)


def check(response: httpx.Response) -> httpx.Response:
    """Raise for an error answer: RetryableStatus for the retryable ones, else ApiError."""
    if response.status_code in RETRY_STATUSES:
        raise RetryableStatus(response)
    if response.status_code >= 400:
        raise api_error(response)
    return response


def give_up(exc: BaseException, url: str, policy: RetryPolicy) -> CompaasError:
    """What the caller sees once every try failed."""
    if isinstance(exc, RetryableStatus):
        return api_error(exc.response)
    tries = f"{policy.attempts} tries" if policy.attempts > 1 else "one try"
    return NetworkError(f"cannot reach the compaas API at {url} after {tries}: {exc!r}")


def existing_file(path: Path) -> Path:
    """The path of a file to upload; FileNotFoundError before anything is sent."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return path


def job_body(
    model_id: str | None,
    *,
    dataset_id: str | None = None,
    preset: str | None = None,
    pipeline: list[dict[str, Any]] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    evaluation: dict[str, Any] | None = None,
    export: list[str] | None = None,
    seed: int | None = None,
    recipe: dict[str, Any] | None = None,
    budget: dict[str, float] | None = None,
    objective: str | None = None,
    search: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The POST /v1/jobs body, checked here against the API's own schema before it is sent."""
    given = {
        "model_id": model_id,
        "dataset_id": dataset_id,
        "preset": preset,
        "pipeline": pipeline,
        "overrides": overrides,
        "evaluation": evaluation,
        "export": export,
        "seed": seed,
        "recipe": recipe,
        "budget": budget,
        "objective": objective,
        "search": search,
    }
    body = {k: v for k, v in given.items() if v is not None}
    return JobCreate.model_validate(body).model_dump(mode="json", exclude_unset=True)


_FILENAME_STAR = re.compile(r"filename\*\s*=\s*(?:UTF-8|utf-8)''([^;]+)")
_FILENAME = re.compile(r'filename\s*=\s*"?([^";]+)"?')


def download_name(response: httpx.Response, artifact: ArtifactRead) -> str:
    """The server's file name (Content-Disposition, RFC 6266), reduced to a safe base name."""
    header = response.headers.get("content-disposition", "")
    match = _FILENAME_STAR.search(header) or _FILENAME.search(header)
    name = unquote(match.group(1)).strip() if match else ""
    name = Path(name.replace("\\", "/")).name.lstrip(".")
    return name or f"{artifact.id}.{artifact.format}"


def unique_path(directory: Path, name: str, artifact: ArtifactRead, taken: set[Path]) -> Path:
    path = directory / name
    if path in taken:
        path = directory / f"{artifact.id}-{name}"
    taken.add(path)
    return path


class HashingWriter:
    """Writes a download to PATH.part while hashing it; `finish` checks and renames it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.part = path.with_name(path.name + ".part")
        self.digest = hashlib.sha256()
        self.fh = self.part.open("wb")

    def write(self, chunk: bytes) -> None:
        self.digest.update(chunk)
        self.fh.write(chunk)

    def abort(self) -> None:
        self.fh.close()
        self.part.unlink(missing_ok=True)

    def finish(self, expected: str) -> Path:
        self.fh.close()
        got = self.digest.hexdigest()
        if got != expected:
            self.part.unlink(missing_ok=True)
            raise ChecksumMismatch(
                f"{self.path.name}: downloaded sha256 {got} is not the artifact's {expected}"
            )
        self.part.replace(self.path)
        return self.path


def poll_interval(progressed: bool, current: float, base: float) -> float:
    """Poll every `base` seconds while a job moves, back off to 5 s while it does not."""
    return base if progressed else min(5.0, current * 1.5)
