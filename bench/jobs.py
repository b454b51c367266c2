"""Job plumbing, measured side by side in one run: queued→running latency on an idle worker, and
small-job throughput with 1 and 2 worker processes (real Postgres, Redis and Celery workers).

    .venv/bin/python bench/jobs.py [--jobs 20]

Prints ratios and medians; it is not a test and never gates on absolute times.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import redis
from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.cli import worker_command  # noqa: E402
from app.config import Settings  # noqa: E402
from app.db.migrate import upgrade  # noqa: E402
from app.main import create_app  # noqa: E402

PG_ADMIN = os.environ.get("COMPAAS_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("COMPAAS_TEST_REDIS", "redis://127.0.0.1:6379/14")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20)
    args = parser.parse_args()
    db = f"compaas_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    tmp = Path(tempfile.mkdtemp(prefix="compaas-bench-"))
    env = {
        "COMPAAS_DATA_DIR": str(tmp),
        "COMPAAS_DATABASE_URL": PG_ADMIN.rsplit("/", 1)[0].replace(
            "postgresql://", "postgresql+psycopg://"
        )
        + f"/{db}",
        "COMPAAS_BROKER_URL": REDIS_URL,
        "COMPAAS_WORKER_QUEUES": f"bench-{uuid.uuid4().hex[:6]}",
        "COMPAAS_INSPECT_QUEUE": f"bench-inspect-{uuid.uuid4().hex[:6]}",
        "COMPAAS_RUN_RECONCILER": "false",
    }
    os.environ.update(env)
    redis.Redis.from_url(REDIS_URL).flushdb()
    settings = Settings()
    upgrade(settings.database_url)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        from engine.examples import write_digits_example

        files = write_digits_example(tmp / "ex")
        team = subprocess.run(
            [sys.executable, "-m", "app.cli", "admin", "create-team", "bench", "--json"],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        import json

        headers = {"Authorization": f"Bearer {json.loads(team)['api_key']}"}
        with TestClient(create_app(settings)) as client:
            workers.append(_worker(settings, tmp, 0))
            with files["onnx"].open("rb") as fh:
                model = client.post("/v1/models", files={"file": fh}, headers=headers).json()
            _wait(client, f"/v1/models/{model['id']}", headers, ("ready", "invalid"))
            body = {
                "model_id": model["id"],
                "pipeline": [{"op": "quantize", "dtype": "fp16"}],
                "evaluation": {"task": "generic"},
            }

            latencies = []
            for _ in range(8):
                job = client.post("/v1/jobs", json=body, headers=headers).json()
                done = _wait(client, f"/v1/jobs/{job['id']}", headers, ("succeeded", "failed"))
                latencies.append(_ts(done["started_at"]) - _ts(done["created_at"]))
            rates = {}
            for n in (1, 2):
                while len(workers) < n:
                    workers.append(_worker(settings, tmp, len(workers)))
                started = time.monotonic()
                ids = [
                    client.post("/v1/jobs", json=body, headers=headers).json()["id"]
                    for _ in range(args.jobs)
                ]
                for job_id in ids:
                    _wait(client, f"/v1/jobs/{job_id}", headers, ("succeeded", "failed"))
                rates[n] = args.jobs / (time.monotonic() - started) * 60
        ms = sorted(x * 1000 for x in latencies)
        print(
            f"queued→running on an idle worker: median {statistics.median(ms):.0f} ms "
            f"(min {ms[0]:.0f}, max {ms[-1]:.0f}) over {len(ms)} jobs"
        )
        print("| workers | small jobs/minute | vs 1 worker |")
        print("|---|---|---|")
        for n, rate in rates.items():
            print(f"| {n} | {rate:.1f} | {rate / rates[1]:.2f}× |")
    finally:
        for w in workers:
            os.killpg(w.pid, signal.SIGTERM)
        for w in workers:
            w.wait(timeout=30)
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def _worker(settings: Settings, tmp: Path, i: int) -> subprocess.Popen[bytes]:
    log = tmp / f"worker-{i}.log"
    proc = subprocess.Popen(
        worker_command(
            f"{settings.worker_queues},{settings.inspection_queue}", 1, name=f"bench{i}"
        ),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while "ready." not in log.read_text():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.2)
    return proc


def _wait(client: TestClient, url: str, headers: dict[str, str], states: tuple[str, ...]) -> dict:
    while True:
        body = client.get(url, headers=headers).json()
        if body["status"] in states:
            return body
        time.sleep(0.05)


def _ts(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value).timestamp()


if __name__ == "__main__":
    main()
