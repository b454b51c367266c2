"""Tests that measure time run alone, even under pytest-xdist.

The suite runs on two processes (`-n 2`): most integration tests wait on leases, restarts and
worker processes, and two of them overlap well. A test that asserts on a measured latency (a
speed-up, a faster variant chosen) would read the other process's load as its own, so it is
marked `exclusive`: it takes an exclusive lock for its setup, call and teardown, and every
other test takes the same lock shared. A turnstile lock in front keeps a waiting exclusive test
from being starved by a stream of shared ones. Without xdist the locks are never contended.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest


def _lock_dir(config: pytest.Config) -> Path:
    """A directory every xdist worker of this run shares (the parent of each worker's basetemp),
    and no other run does."""
    base = config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def _held(path: Path, mode: int) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def run_lock(directory: Path, exclusive: bool) -> Iterator[None]:
    turnstile, room = directory / "exclusive.turnstile", directory / "exclusive.room"
    if exclusive:
        with _held(turnstile, fcntl.LOCK_EX), _held(room, fcntl.LOCK_EX):
            yield
        return
    with _held(turnstile, fcntl.LOCK_EX):
        pass  # wait here while an exclusive test is queued or running
    with _held(room, fcntl.LOCK_SH):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    with run_lock(_lock_dir(item.config), item.get_closest_marker("exclusive") is not None):
        yield
