"""Zip bombs uploaded to a real API process: refused from the central directory, RSS flat.

Issue #10: a 1 MB .pt2 whose `archive_format` member inflates to 1 GiB was read whole in the
async upload handler (RSS 2.1 GB, /healthz 11.7 s). What is asserted is behaviour: each bomb is
refused from its central directory, the API's RSS stays flat (nothing inflated) and every
/healthz probe made meanwhile is answered 200. The probes' worst latency is printed, not
asserted: a wall-clock bound fails on a busy machine, not on a regression.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.security.uploads_support import (
    Server,
    api_server,
    npy_header,
    write_pt2_bomb,
    write_zip_bomb,
)

pytestmark = pytest.mark.slow

GiB = 1 << 30
MiB = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with api_server(tmp_path_factory.mktemp("zip-bomb")) as server:
        yield server


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("bombs")
    pt2 = out / "bomb.pt2"
    write_pt2_bomb(pt2, GiB)
    npz = out / "bomb.npz"
    write_zip_bomb(npz, "x.npy", GiB, npy_header((GiB // 4 - 32,)))
    return {"models": pt2, "datasets": npz}


class HealthProbe(threading.Thread):
    """Polls /healthz and the API's VmRSS until stopped; keeps the worst of each."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.statuses: list[int] = []
        self.max_rss = server.rss_bytes()

    def run(self) -> None:
        with httpx.Client(base_url=self.server.base_url, timeout=30) as client:
            while not self.stop.is_set():
                start = time.perf_counter()
                status = client.get("/healthz").status_code
                self.latencies.append(time.perf_counter() - start)
                self.statuses.append(status)
                self.max_rss = max(self.max_rss, self.server.rss_bytes())
                time.sleep(0.01)


@pytest.mark.parametrize("route", ["models", "datasets"])
def test_zip_bomb_is_refused_without_inflating(
    server: Server, bombs: dict[str, Path], route: str
) -> None:
    _, headers = server.new_team(f"bomber-{route}")
    bomb = bombs[route]
    assert bomb.stat().st_size < 2 * MiB
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as client:
        client.get("/healthz")
        rss_before = server.rss_bytes()
        probe = HealthProbe(server)
        probe.start()
        try:
            for _ in range(5):
                with bomb.open("rb") as fh:
                    reply = client.post(f"/v1/{route}", files={"file": (bomb.name, fh)})
                assert reply.status_code == 422, reply.text
                problem = reply.json()
                assert reply.headers["content-type"].startswith("application/problem+json")
                assert problem["code"] == "archive_too_large"
                assert problem["field"] == "file"
            time.sleep(0.2)
        finally:
            probe.stop.set()
            probe.join()
        assert client.get(f"/v1/{route}").json()["items"] == []
    growth = probe.max_rss - rss_before
    print(
        f"{route}: RSS {rss_before / MiB:.1f} MiB -> max {probe.max_rss / MiB:.1f} MiB, "
        f"/healthz max {max(probe.latencies) * 1000:.1f} ms over {len(probe.latencies)} probes"
    )
    assert growth <= 64 * MiB
    assert probe.statuses and set(probe.statuses) == {200}
    assert server.spool_files() == []
