"""Riding out short database outages: retry a transaction with backoff until a deadline.

A Postgres restart or a dropped connection surfaces as `OperationalError` (or another
`DBAPIError` whose connection was invalidated). An attempt's writes retry those for as long as
its lease lasts; only when the lease has really run out does the attempt give up, since by then
another worker may own the job. Errors in what we asked (a constraint, a bad statement) are not
retried: they would fail the same way again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 2.0


class OutageOutlasted(Exception):
    """The database stayed unreachable until the deadline (the attempt's lease ran out)."""


def transient(exc: BaseException) -> bool:
    """Whether `exc` is the database being unreachable rather than the statement being wrong."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def retry_until(
    action: Callable[[], T],
    deadline: float,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """`action()`, retried on transient database errors with exponential backoff (0.1 s up to
    2 s) until the monotonic `deadline`; OutageOutlasted once it is reached."""
    backoff = FIRST_BACKOFF_S
    failures = 0
    while True:
        try:
            result = action()
        except Exception as exc:
            if not transient(exc):
                raise
            failures += 1
            left = deadline - clock()
            if left <= 0:
                raise OutageOutlasted(f"{what}: database unreachable until the deadline") from exc
            log.warning(
                "%s: database unreachable (%s); retry %d in %.1f s (%.1f s of lease left)",
                what,
                type(exc).__name__,
                failures,
                min(backoff, left),
                left,
            )
            sleep(min(backoff, left))
            backoff = min(backoff * 2, MAX_BACKOFF_S)
            continue
        if failures:
            log.info("%s: database reachable again after %d retries", what, failures)
        return result
