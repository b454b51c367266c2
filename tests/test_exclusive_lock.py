"""The lock that lets timing tests run alone under pytest-xdist (tests/exclusive.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from tests.exclusive import run_lock


def _enter(directory: Path, exclusive: bool, log: list[str], name: str, hold: float) -> None:
    with run_lock(directory, exclusive):
        log.append(f"{name} in")
        time.sleep(hold)
        log.append(f"{name} out")


def test_shared_holders_overlap_and_an_exclusive_one_waits_for_them(tmp_path: Path) -> None:
    log: list[str] = []
    a = threading.Thread(target=_enter, args=(tmp_path, False, log, "a", 0.4))
    b = threading.Thread(target=_enter, args=(tmp_path, False, log, "b", 0.4))
    a.start(), b.start()
    time.sleep(0.1)
    x = threading.Thread(target=_enter, args=(tmp_path, True, log, "x", 0.3))
    x.start()
    time.sleep(0.1)
    late = threading.Thread(target=_enter, args=(tmp_path, False, log, "late", 0.0))
    late.start()  # queued behind the exclusive one, not let in ahead of it
    for t in (a, b, x, late):
        t.join(timeout=5)
    assert set(log[:2]) == {"a in", "b in"}  # the two shared holders ran together
    assert log.index("x in") > max(log.index("a out"), log.index("b out"))
    assert log.index("x out") == log.index("x in") + 1  # nothing ran beside the exclusive one
    assert log.index("late in") > log.index("x out")
