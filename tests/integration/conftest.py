"""Real services: Postgres and Redis on localhost, and a real Celery worker process per stack."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from fastapi.testclient import TestClient

from app.cli import worker_command
from app.config import Settings
from app.db.migrate import upgrade
from app.main import create_app

PG_ADMIN_URL = os.environ.get(
    "COMPAAS_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("COMPAAS_TEST_REDIS", "redis://127.0.0.1:6379/15")
ROOT = Path(__file__).resolve().parents[2]


def wait_for(predicate: Callable[[], Any], timeout: float = 120, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


@dataclass
class Stack:
    """One deployment: database + broker + blob dir, a worker process and an API client."""

    name: str
    settings: Settings
    env: dict[str, str]
    client: TestClient
    worker_log: Path

    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_worker(self, **env: str) -> subprocess.Popen[bytes]:
        """A real Celery worker process (its own process group, so tests can SIGKILL it all)."""
        log_path = self.worker_log.with_name(f"worker-{len(self.workers)}.log")
        log = log_path.open("w")
        worker = subprocess.Popen(
            worker_command(self.settings.worker_queues, 1),
            env={**self.env, **env},
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.workers.append(worker)
        wait_for(lambda: "ready." in log_path.read_text() or worker.poll() is not None, 60)
        assert worker.poll() is None, log_path.read_text()
        return worker

    def stop_workers(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
        for worker in self.workers:
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        self.workers.clear()

    def worker_logs(self) -> str:
        return "\n".join(
            p.read_text()[-3000:] for p in sorted(self.worker_log.parent.glob("worker-*.log"))
        )

    def new_team(self, name: str = "team") -> tuple[str, dict[str, str]]:
        out = subprocess.run(
            [sys.executable, "-m", "app.cli", "admin", "create-team", name, "--json"],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        data = json.loads(out.stdout)
        return data["team_id"], {"Authorization": f"Bearer {data['api_key']}"}

    def upload(self, route: str, path: Path, headers: dict[str, str], **fields: str) -> Any:
        with path.open("rb") as fh:
            return self.client.post(
                f"/v1/{route}", files={"file": (path.name, fh)}, data=fields, headers=headers
            )

    def wait_model(self, model_id: str, headers: dict[str, str]) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            body = self.client.get(f"/v1/models/{model_id}", headers=headers).json()
            return body if body["status"] != "pending" else None

        return wait_for(done, timeout=120)

    def wait_job(
        self, job_id: str, headers: dict[str, str], timeout: float = 300
    ) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            body = self.client.get(f"/v1/jobs/{job_id}", headers=headers).json()
            return body if body["status"] in ("succeeded", "failed", "canceled") else None

        try:
            return wait_for(done, timeout=timeout, interval=0.5)
        except AssertionError:
            print(self.worker_logs())
            raise


def settings_from(env: dict[str, str]) -> Settings:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return Settings()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _start_stack(name: str, env: dict[str, str], tmp: Path, workers: int = 1) -> Iterator[Stack]:
    full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    settings = settings_from(env)
    upgrade(settings.database_url)
    stack: Stack | None = None
    try:
        with TestClient(create_app(settings)) as client:
            stack = Stack(name, settings, full_env, client, tmp / "worker-0.log")
            for _ in range(workers):
                stack.start_worker()
            yield stack
    finally:
        if stack is not None:
            stack.stop_workers()


@pytest.fixture(scope="session")
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture(scope="session")
def postgres_db() -> Iterator[str]:
    name = f"compaas_it_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_stack(postgres_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Postgres + Redis + local blob dir, as in a production deployment."""
    redis.Redis.from_url(REDIS_URL).flushdb()
    tmp = tmp_path_factory.mktemp("pg-stack")
    env = {
        "COMPAAS_MODE": "embedded",
        "COMPAAS_DATA_DIR": str(tmp),
        "COMPAAS_DATABASE_URL": postgres_db,
        "COMPAAS_BROKER_URL": REDIS_URL,
        "COMPAAS_WORKER_QUEUES": f"it-{uuid.uuid4().hex[:8]}",
        "COMPAAS_API_KEY_PEPPER": "integration-test-pepper",
        "COMPAAS_JOB_MEMORY_LIMIT_MB": "6144",
    }
    yield from _start_stack("postgres", env, tmp)


@pytest.fixture(scope="session")
def sqlite_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The embedded default: SQLite, local blobs, Celery's filesystem transport."""
    tmp = tmp_path_factory.mktemp("sqlite-stack")
    env = {
        "COMPAAS_MODE": "embedded",
        "COMPAAS_DATA_DIR": str(tmp),
        "COMPAAS_DATABASE_URL": "",
        "COMPAAS_BROKER_URL": "",
        "COMPAAS_WORKER_QUEUES": "default",
        "COMPAAS_JOB_MEMORY_LIMIT_MB": "6144",
    }
    yield from _start_stack("sqlite", env, tmp)


@pytest.fixture(params=["postgres", "sqlite"])
def stack(request: pytest.FixtureRequest) -> Stack:
    name = {"postgres": "pg_stack", "sqlite": "sqlite_stack"}[request.param]
    return request.getfixturevalue(name)
