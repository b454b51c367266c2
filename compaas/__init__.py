"""compaas Python SDK: `Client` / `AsyncClient` for the compaas compression API (docs/sdk.md)."""

from compaas._http import RetryPolicy
from compaas.aio import AsyncClient, AsyncJob
from compaas.client import Client, Job
from compaas.errors import (
    ApiError,
    ChecksumMismatch,
    CompaasError,
    NetworkError,
    UploadInvalid,
    WaitTimeout,
)
from compaas.types import JobEvent

__all__ = [
    "ApiError",
    "AsyncClient",
    "AsyncJob",
    "ChecksumMismatch",
    "Client",
    "CompaasError",
    "Job",
    "JobEvent",
    "NetworkError",
    "RetryPolicy",
    "UploadInvalid",
    "WaitTimeout",
]
