"""Exit codes, printing (--json: machine-readable only on stdout) and error mapping."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from enum import IntEnum
from typing import Any, ParamSpec, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console

from compaas.errors import (
    ApiError,
    ChecksumMismatch,
    CompaasError,
    NetworkError,
    UploadInvalid,
    WaitTimeout,
)


class ExitCode(IntEnum):
    """What a script can rely on (docs/sdk.md#exit-codes)."""

    OK = 0
    FAILED = 1  # the job failed, was canceled or is under its quality floor; a check failed
    USAGE = 2  # bad options or input, a missing file, no API key configured
    API = 3  # the API refused the request (its problem+json is printed)
    NETWORK = 4  # the API could not be reached after every retry
    TIMEOUT = 5  # --timeout passed while the job was still running
    INTERRUPTED = 130  # Ctrl-C


out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, highlight=False)


def plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def emit_json(value: Any) -> None:
    """One JSON document on stdout, nothing else (no Rich markup, no wrapping)."""
    sys.stdout.write(json.dumps(plain(value), indent=2, default=str) + "\n")
    sys.stdout.flush()


def fail(code: ExitCode, message: str, as_json: bool, **error: Any) -> typer.Exit:
    """Say what went wrong (stderr; with --json also {"error": …} on stdout); the Exit to raise."""
    err.print(f"[bold red]error:[/] {message}", markup=True)
    if as_json:
        emit_json({"error": {"exit_code": int(code), "message": message, **error}})
    return typer.Exit(int(code))


P = ParamSpec("P")
R = TypeVar("R")


def handles_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Map the SDK's exceptions onto the documented exit codes and readable messages."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        as_json = bool(kwargs.get("as_json"))
        try:
            return command(*args, **kwargs)
        except ApiError as exc:
            where = f" (field {exc.field})" if exc.field else ""
            raise fail(
                ExitCode.API,
                f"the API answered {exc.status} {exc.code}{where}: {exc.detail}",
                as_json,
                status=exc.status,
                problem=exc.problem,
            ) from None
        except NetworkError as exc:
            raise fail(ExitCode.NETWORK, str(exc), as_json) from None
        except WaitTimeout as exc:
            raise fail(ExitCode.TIMEOUT, str(exc), as_json) from None
        except (UploadInvalid, ChecksumMismatch) as exc:
            raise fail(ExitCode.FAILED, str(exc), as_json) from None
        except (FileNotFoundError, IsADirectoryError, ValueError) as exc:
            raise fail(ExitCode.USAGE, str(exc), as_json) from None
        except CompaasError as exc:
            raise fail(ExitCode.API, str(exc), as_json) from None
        except KeyboardInterrupt:
            raise fail(ExitCode.INTERRUPTED, "interrupted", as_json) from None

    return wrapper
