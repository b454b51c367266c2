"""Polling GET /v1/jobs/{id} at scale: the whole document, ?view=status, and conditional 304s.

    .venv/bin/python bench/polling.py [--processes N] [--concurrency 32] [--seconds 10]

Starts the production topology's API on this machine: `compaas api` with N processes (default:
one per usable core, as compose runs it) in production mode, on a fresh database it creates on
the machine's Postgres (COMPAAS_TEST_PG_ADMIN, default 127.0.0.1:5432) and drops at the end, and
a private redis-server on a free port (the rate-limit counters, shared by the processes, as in
production). It creates a team and one job row shaped like a finished 4-step job (about 11 KB
of JSON), then an async httpx client in this process keeps `concurrency` requests in flight for
`seconds` per scenario and prints requests/s and p50/p99 latency. The client shares the cores
with the API; it is not a test and never gates on absolute times.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.config import Settings  # noqa: E402
from app.db.base import utcnow  # noqa: E402
from app.db.migrate import upgrade  # noqa: E402
from app.db.models import JobStatus, StepStatus  # noqa: E402
from app.db.repositories import JobRepository, TeamJobRepository  # noqa: E402
from app.db.session import session_scope  # noqa: E402
from app.processes import available_cpus  # noqa: E402

PG_ADMIN = os.environ.get("COMPAAS_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
PEPPER = "bench-polling-pepper-0123456789abcdef0123456789"


@dataclass
class Result:
    name: str
    statuses: dict[int, int]
    latencies: list[float]
    seconds: float
    body_bytes: int
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0

    @property
    def total(self) -> int:
        """Every request sent, warm-up included (what the CPU times cover)."""
        return self.sent

    sent: int = 0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) used so far by a process and its live descendants."""
    ticks = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0.0))[1]
        todo += [child for child, (parent, _) in stats.items() if parent == pid]
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what} did not come up within {timeout} s")


def finished_job(settings: Settings, team_id: str) -> str:
    """A succeeded 4-step job with metrics, per-layer details and two artifacts (~11 KB)."""
    layers = [
        {"name": f"/features/conv{i}/Conv", "sensitivity": 0.01 * i, "bits": 8, "sparsity": 0.3}
        for i in range(24)
    ]
    metrics = {
        "size_bytes": {"before": 1_812_345, "after": 471_230},
        "latency_ms": {"before": 1.92, "after": 0.81, "p90_after": 0.88},
        "accuracy": {"before": 0.981, "after": 0.975, "agreement_top1": 0.991},
        "macs": {"before": 12_345_678, "after": 4_321_000},
    }
    with session_scope(settings.database_url) as session:
        jobs = TeamJobRepository(session, team_id)
        job = jobs.create(
            model_id=None,
            status=JobStatus.queued,
            preset="edge-int8",
            evaluation={"task": "classification", "holdout": 0.3},
            export=["onnx"],
        )
        ops = ["prune", "fine_tune", "quantize", "export"]
        for index, op in enumerate(ops):
            jobs.add_step(job.id, index, op, {"op": op, "sparsity": 0.3, "scheme": "static"})
        session.flush()
        token = JobRepository(session).claim(job.id, "bench", utcnow() + timedelta(minutes=5))
        assert token is not None
        for index, op in enumerate(ops):
            artifact = JobRepository(session).add_artifact(
                team_id=team_id,
                job_id=job.id,
                step_index=index,
                role="checkpoint" if index < len(ops) - 1 else "final",
                format="onnx",
                blob_key=f"jobs/{job.id}/step-{index}.onnx",
                size_bytes=471_230,
                sha256="ab" * 32,
                verdict="ok",
            )
            JobRepository(session).update_step(
                job.id,
                index,
                status=StepStatus.succeeded,
                metrics=metrics,
                warnings=[f"{op}: 2 layers kept at full precision (too sensitive)"],
                details={"layers": layers[: 24 // (index + 1)]},
                artifact_id=artifact.id,
                started_at=utcnow(),
                finished_at=utcnow(),
            )
        JobRepository(session).update_fenced(
            job.id,
            token,
            status=JobStatus.succeeded,
            progress=1.0,
            current_step=None,
            metrics=metrics,
            finished_at=utcnow(),
        )
        return job.id


async def load(
    name: str, url: str, headers: dict[str, str], concurrency: int, seconds: float, warmup: float
) -> Result:
    """`concurrency` loops, each with its own client and keep-alive connection, sending the next
    request when the last one is answered. (One client with a pool of 32 connections costs the
    client about 2.5 times the CPU per request: httpx's pool does work per pooled connection.)"""
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    body_bytes = sent = 0
    measuring_from = time.perf_counter() + warmup
    stop = measuring_from + seconds

    async def one_client() -> None:
        nonlocal body_bytes, sent
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=1), timeout=30) as client:
            while (now := time.perf_counter()) < stop:
                resp = await client.get(url, headers=headers)
                sent += 1
                if now >= measuring_from:
                    latencies.append(time.perf_counter() - now)
                    statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
                    body_bytes = len(resp.content)

    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return Result(name, statuses, latencies, seconds, body_bytes, sent=sent)


def run_loop(coro: Any) -> Any:
    """uvloop when installed (the client's CPU is the machine's too), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def server_stack() -> str:
    """The event loop and HTTP parser uvicorn picks (loop/http "auto") where the API runs."""
    found = {name: importlib.util.find_spec(name) is not None for name in ("uvloop", "httptools")}
    loop = "uvloop" if found["uvloop"] else "asyncio"
    return f"{loop} + {'httptools' if found['httptools'] else 'h11'}"


def table(results: list[Result], processes: int, concurrency: int) -> str:
    lines = [
        f"GET /v1/jobs/{{id}}: {processes} API process(es), concurrency {concurrency}, "
        f"{os.cpu_count()} cores visible ({available_cpus()} usable), client on the same machine, "
        f"uvicorn with {server_stack()}",
        "",
        "",
        "| view | req/s | p50 ms | p99 ms | API CPU ms/req | client CPU ms/req | body bytes "
        "| statuses |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        done = max(1, r.total)
        lines.append(
            f"| {r.name} | {r.rate:,.0f} | {r.percentile(0.5):.1f} | {r.percentile(0.99):.1f} "
            f"| {1000 * r.server_cpu_s / done:.2f} | {1000 * r.client_cpu_s / done:.2f} "
            f"| {r.body_bytes:,} | {dict(sorted(r.statuses.items()))} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=0, help="0: one per usable core")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--only", default="", help="scenario numbers, e.g. 0,2 (default: all)")
    args = parser.parse_args()
    processes = args.processes or available_cpus()

    db = f"compaas_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    tmp = Path(tempfile.mkdtemp(prefix="compaas-polling-"))
    redis_port, api_port = free_port(), free_port()
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "COMPAAS_MODE": "production",
        "COMPAAS_DATA_DIR": str(tmp),
        "COMPAAS_DATABASE_URL": f"{base}/{db}",
        "COMPAAS_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
        "COMPAAS_API_KEY_PEPPER": PEPPER,
        "COMPAAS_API_WORKERS": str(processes),
        # one team polling as fast as it can: far above the default 3000 requests a minute
        "COMPAAS_TEAM_REQUESTS_PER_WINDOW": "100000000",
    }
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            subprocess.Popen(
                ["redis-server", "--bind", "127.0.0.1", "--port", str(redis_port)]
                + ["--save", "", "--appendonly", "no", "--dir", str(tmp)],
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            **{k.removeprefix("COMPAAS_").lower(): v for k, v in env.items() if "COMPAAS_" in k},  # type: ignore[arg-type]
        )
        upgrade(settings.database_url)
        team = subprocess.run(
            [sys.executable, "-m", "app.cli", "admin", "create-team", "bench", "--json"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        created = json.loads(team)
        headers = {"Authorization": f"Bearer {created['api_key']}"}
        job_id = finished_job(settings, created["team_id"])
        log = (tmp / "api.log").open("w")
        api = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "api", "--host", "127.0.0.1"]
            + ["--port", str(api_port)],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(api)
        root = f"http://127.0.0.1:{api_port}"
        wait_until(lambda: httpx.get(f"{root}/healthz").status_code == 200, 60, "the API")
        url = f"{root}/v1/jobs/{job_id}"
        full = httpx.get(url, headers=headers)
        assert full.status_code == 200, full.text
        tag = full.headers["etag"]
        assert httpx.get(url, headers={**headers, "If-None-Match": tag}).status_code == 304
        scenarios = [
            ("/healthz (no auth, no database)", f"{root}/healthz", {}),
            ("full document", url, headers),
            ("?view=status", f"{url}?view=status", headers),
            ("full, If-None-Match (304)", url, {**headers, "If-None-Match": tag}),
        ]
        only = args.only.split(",") if args.only else None
        results = []
        for i, (name, u, h) in enumerate(scenarios):
            if only is not None and str(i) not in only:
                continue
            server, client = tree_cpu_s(api.pid), time.process_time()
            result = run_loop(load(name, u, h, args.concurrency, args.seconds, args.warmup))
            result.server_cpu_s = tree_cpu_s(api.pid) - server
            result.client_cpu_s = time.process_time() - client
            results.append(result)
        print(table(results, processes, args.concurrency))
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
