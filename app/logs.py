"""Logging for every compaas process (API, worker, reconciler), configured in one place.

structlog renders every line; the standard library's `logging.getLogger(...)` calls used across
the code (and by uvicorn, Celery, SQLAlchemy) go through structlog's ProcessorFormatter on the
root handler, so they come out in the same format. Values bound with `bind()` / structlog's
contextvars (a request's `request_id`, a job's `job_id`, `attempt`, `step`) are added to every
line logged in that context, by either API.

Format: COMPAAS_LOG_FORMAT=json (one JSON object a line), console (human-readable, coloured),
or auto (the default): console when stderr is a terminal (`compaas up` in a shell), JSON
otherwise (containers, log files, tests). The engine never imports this module; it logs with
the standard library and the worker binds the job's ids around the engine call.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import Processor

LogFormat = Literal["auto", "json", "console"]
ENV_FORMAT = "COMPAAS_LOG_FORMAT"
# Chatty libraries kept at WARNING unless the level asks for DEBUG.
QUIET = ("httpx", "httpcore", "botocore", "boto3", "urllib3", "s3transfer", "kombu", "amqp")


def resolve_format(
    fmt: str | None = None, stream: TextIO | None = None
) -> Literal["json", "console"]:
    """`fmt` (or COMPAAS_LOG_FORMAT, default auto) made concrete: auto is console on a TTY."""
    chosen = (fmt or os.environ.get(ENV_FORMAT) or "auto").strip().lower()
    if chosen not in ("auto", "json", "console"):
        raise ValueError(f"{ENV_FORMAT} must be auto, json or console, not {chosen!r}")
    if chosen == "auto":
        target = stream if stream is not None else sys.stderr
        isatty = getattr(target, "isatty", None)
        return "console" if isatty is not None and isatty() else "json"
    return chosen  # type: ignore[return-value]


def _shared(process: str) -> list[Processor]:
    """What every line gets, from structlog or the standard library."""

    def add_process(_: Any, __: str, event: structlog.typing.EventDict) -> Any:
        event.setdefault("process", process)
        event.pop("color_message", None)  # uvicorn's copy of the message with ANSI colours
        return event

    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_process,
    ]


def configure(
    process: str,
    fmt: str | None = None,
    level: int | str = logging.INFO,
    stream: TextIO | None = None,
) -> Literal["json", "console"]:
    """Route structlog and the standard library's logging to one handler on `stream` (stderr)
    in the chosen format; returns the format used. Safe to call again (it replaces the handler)."""
    resolved = resolve_format(fmt, stream)
    shared = _shared(process)
    renderer: Processor
    if resolved == "json":
        renderer = structlog.processors.JSONRenderer()
        tail: list[Processor] = [structlog.processors.format_exc_info]
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=bool(getattr(stream or sys.stderr, "isatty", lambda: False)())
        )
        tail = []
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *tail,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter)
    handler.set_name("compaas")
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == "compaas":  # ours from an earlier call; others (pytest's) stay
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # uvicorn's and Celery's own loggers: let them reach the root handler instead of theirs.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery"):
        named = logging.getLogger(name)
        named.handlers.clear()
        named.propagate = True
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    return resolved


def get_logger(name: str) -> Any:
    """A structlog logger that goes through the standard library (and so `configure`)."""
    return structlog.stdlib.get_logger(name)


@contextmanager
def bind(**values: Any) -> Iterator[None]:
    """Add `values` to every line logged in this context (this thread or task); on leaving,
    the context is as it was before, including what `bind_more` added inside."""
    saved = structlog.contextvars.get_contextvars()
    structlog.contextvars.bind_contextvars(**values)
    try:
        yield
    finally:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(**saved)


def bind_more(**values: Any) -> None:
    """Add `values` to the current context until the enclosing `bind` ends (e.g. a job's step)."""
    structlog.contextvars.bind_contextvars(**values)


def clear() -> None:
    """Forget everything bound in this context (a worker process between two tasks)."""
    structlog.contextvars.clear_contextvars()


def current(key: str) -> Any:
    """A value bound in this context (e.g. the request's `request_id`), or None."""
    return structlog.contextvars.get_contextvars().get(key)
