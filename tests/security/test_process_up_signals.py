"""`compaas up` takes its Celery workers (jobs, inspections) down with it: a real `up` process,
signalled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.integration  # starts `compaas up` with its Celery worker

ROOT = Path(__file__).resolve().parents[2]
# generous: the worker's warm shutdown of an idle pool takes ~1-3 s, the SIGKILL fallback
# comes after app.cli.WORKER_STOP_GRACE_S (10 s), and two loaded cores slow everything down
GONE_WITHIN_S = 60.0


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: [state, ppid, ..., starttime at index 19]."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return found


def tree(pid: int) -> dict[int, str]:
    """Every descendant of pid, with its start time (so a reused pid is not mistaken for it)."""
    out: dict[int, str] = {}
    stack = children(pid)
    while stack:
        child = stack.pop()
        fields = stat_fields(child)
        if fields is not None:
            out[child] = fields[19]
            stack += children(child)
    return out


def alive(pid: int, started: str) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[19] == started and fields[0] not in ("Z", "X")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


@pytest.fixture
def compaas_up(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[int, str], Path]]:
    """A real `compaas up` on a free port and a temp data dir, once both its worker groups
    (jobs and inspections, each with its pool) are up."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPAAS_")}
    env["PYTHONPATH"] = str(ROOT)
    log_path = tmp_path / "up.log"
    port = free_port()
    with log_path.open("wb") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "up", "--port", str(port)]
            + ["--data-dir", str(tmp_path / "var")],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    started: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert up.poll() is None, log_path.read_text()
            started.update(tree(up.pid))  # remember every process up started, as it appears
            # both worker groups (jobs, inspections) print `ready.`
            if log_path.read_text().count("ready.") >= 2 and _healthy(port):
                break
            time.sleep(0.5)
        else:
            raise AssertionError("compaas up did not start:\n" + log_path.read_text()[-3000:])
        started.update(tree(up.pid))
        queues = {
            part.removeprefix("--queues=")
            for pid in started
            for part in cmdline(pid).split()
            if part.startswith("--queues=")
        }
        assert queues == {"default", "inspect"}, started  # the job and the inspection worker
        assert len(started) >= 4, started  # each with its pool process
        yield up, started, log_path
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        for pid, start in started.items():  # never leave what this test started behind
            if alive(pid, start):
                os.kill(pid, signal.SIGKILL)


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=str)
def test_signal_to_compaas_up_stops_its_worker(
    compaas_up: tuple[subprocess.Popen[bytes], dict[int, str], Path], sig: signal.Signals
) -> None:
    up, started, log_path = compaas_up
    up.send_signal(sig)
    up.wait(timeout=GONE_WITHIN_S)
    deadline = time.monotonic() + GONE_WITHIN_S
    while time.monotonic() < deadline and any(alive(p, s) for p, s in started.items()):
        time.sleep(0.25)
    left = {p: cmdline(p) for p, s in started.items() if alive(p, s)}
    assert not left, f"still running after {sig.name}: {left}\n{log_path.read_text()[-3000:]}"
    if sig != signal.SIGKILL:
        assert up.returncode in (0, 128 + sig, -sig), up.returncode
