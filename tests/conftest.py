"""Shared fixtures: models trained once per session, the API in this process on SQLite with no
worker (`api_stack`, for tests/api), and deployments built from real services that the tests
start themselves (a private redis-server, a throwaway Postgres database or a private cluster,
worker processes). Nothing here changes the machine's Redis or Postgres beyond the database it
creates and drops."""

from __future__ import annotations

import contextlib
import glob
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
from tests.exclusive import pytest_runtest_protocol  # noqa: F401  (a hook: tests that time run alone)

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get(
    "COMPAAS_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
# A test that asks for one of these needs servers or a worker: it is an integration test.
INTEGRATION_FIXTURES = frozenset(
    {"stack", "pg_stack", "sqlite_stack", "postgres_db", "redis_server", "redis_url"}
)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist the workers share the machine's cores: one math thread each (torch,
    OpenMP, BLAS; read when those libraries load, after this hook) instead of every worker
    starting a thread per core and all of them oversubscribing the machine."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(var, "1")


def _uses_a_stack_fixture(item: pytest.Item) -> bool:
    """Whether the test uses one of this file's server fixtures: by definition, not by name, so
    a module's own fixture that happens to be called `stack` does not make it an integration
    test."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    for name in INTEGRATION_FIXTURES & set(info.names_closure):
        defs = info.name2fixturedefs.get(name, ())
        if defs and getattr(defs[-1].func, "__module__", None) == __name__:
            return True
    return False


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark integration tests by what they use, so `-m "not integration"` never starts a server."""
    for item in items:
        in_integration = ROOT / "tests" / "integration" in item.path.parents
        if in_integration or _uses_a_stack_fixture(item):
            item.add_marker(pytest.mark.integration)


def wait_for(predicate: Callable[[], Any], timeout: float = 120, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


@dataclass
class Up:
    """A running `compaas up`: its process (own session), base URL and log file."""

    process: subprocess.Popen[bytes]
    api: str
    log: Path


@contextlib.contextmanager
def running_up(
    command: list[str], cwd: Path, env: dict[str, str], *args: str, stop_within_s: float = 30
) -> Iterator[Up]:
    """`command up --port P *args` (command: the `compaas` script, or python -m app.cli) in its
    own session, logging to cwd/up.log; yields once /readyz answers 200 (within 90 s, else the
    log is the failure). On leaving: SIGTERM to the group, SIGKILL if it outlives
    `stop_within_s`."""
    import httpx

    port = free_port()
    api = f"http://127.0.0.1:{port}"
    log_path = cwd / "up.log"
    with log_path.open("w") as log:
        up = subprocess.Popen(
            [*command, "up", "--port", str(port), *args],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:

            def ready() -> bool:
                assert up.poll() is None, log_path.read_text()
                try:
                    return httpx.get(f"{api}/readyz", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            try:
                wait_for(ready, timeout=90, interval=0.3)
            except AssertionError:
                raise AssertionError(log_path.read_text()) from None
            yield Up(up, api, log_path)
        finally:
            os.killpg(up.pid, signal.SIGTERM)
            try:
                up.wait(timeout=stop_within_s)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
                up.wait()


def slow_mlp(out: Path, width: int = 1024, hidden: int = 2) -> dict[str, Path]:
    """An MLP 64 → `hidden` × `width` → 10 (ReLU) as ONNX plus 2000 random samples with labels
    (`onnx`, `npz` under `out`): a job on it runs long enough (static int8 over 2000 samples:
    about 8 s on an idle 2-core machine at the default size) for a test to kill, freeze or
    restart something while it runs, and short enough that a test can run it again."""
    import numpy as np
    import torch

    from engine.examples import export_model

    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Linear(64, width), torch.nn.ReLU()]
    for _ in range(hidden - 1):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))
    out.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(0).standard_normal((2000, 64)).astype(np.float32)
    files = export_model(model, x, out / "slow")
    np.savez(out / "slow.npz", x=x, labels=np.zeros(2000, np.int64))
    return {"onnx": files["onnx"], "npz": out / "slow.npz"}


def own_queues(prefix: str) -> dict[str, str]:
    """A job queue and an inspection queue no other stack on the same Redis uses."""
    suffix = uuid.uuid4().hex[:8]
    return {
        "COMPAAS_WORKER_QUEUES": f"{prefix}-{suffix}",
        "COMPAAS_INSPECT_QUEUE": f"{prefix}-inspect-{suffix}",
    }


def chaos_env(
    tmp: Path, database_url: str, broker_url: str, queue: str, **overrides: str
) -> dict[str, str]:
    """The stack settings of the chaos tests (a test's own Redis and Postgres): tight leases, a
    reconciler every second in the API process, a queue of its own; `overrides` by name."""
    return {
        "COMPAAS_MODE": "embedded",
        "COMPAAS_DATA_DIR": str(tmp),
        "COMPAAS_DATABASE_URL": database_url,
        "COMPAAS_BROKER_URL": broker_url,
        **own_queues(queue),
        "COMPAAS_LEASE_S": "6",
        "COMPAAS_HEARTBEAT_S": "1",
        "COMPAAS_REQUEUE_AFTER_S": "4",
        "COMPAAS_RECONCILE_INTERVAL_S": "1",
        "COMPAAS_RUN_RECONCILER": "true",
        "COMPAAS_MAX_ATTEMPTS": "3",
        "COMPAAS_JOB_MEMORY_LIMIT_MB": "6144",
        **overrides,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create_team(env: dict[str, str], name: str) -> tuple[str, dict[str, str]]:
    """A team made by the real CLI against the settings in `env`: its id and auth header. The
    name gets a random suffix: team names are unique, and parametrized tests share a stack."""
    unique = f"{name}-{uuid.uuid4().hex[:8]}"
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "admin", "create-team", unique, "--json"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(out.stdout)
    return data["team_id"], {"Authorization": f"Bearer {data['api_key']}"}


PROBLEM = "application/problem+json"


def problem(resp: Any, status: int, code: str) -> dict[str, Any]:
    """Assert an RFC 9457 problem answer with this status and code; its body."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = resp.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"].endswith("/" + code)
    assert body["detail"]
    return body


def export_onnx(module: Any, example: Any, path: Path) -> Path:
    """A torch module (eval) as ONNX at opset 17: input `x`, output `out`, dynamic batch."""
    import torch

    torch.onnx.export(
        module.eval(),
        (example,),
        str(path),
        input_names=["x"],
        output_names=["out"],
        opset_version=17,
        dynamic_axes={"x": {0: "n"}, "out": {0: "n"}},
        dynamo=False,
    )
    return path


def npz_bytes(**arrays: Any) -> bytes:
    """An .npz file of these arrays, in memory."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


# ----------------------------------------------------------------------------- private services


class RedisServer:
    """Our own redis-server on a free port, no persistence: tests may flush, kill, restart it."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def ping(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def start(self) -> None:
        """Start (or restart, on the same port) and wait until it answers PING."""
        with (self.workdir / "redis.log").open("a") as log:
            self.proc = subprocess.Popen(
                ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port)]
                + ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = self.proc
        wait_for(lambda: self.ping() or proc.poll() is not None, timeout=20, interval=0.05)
        assert proc.poll() is None, (self.workdir / "redis.log").read_text()[-2000:]

    def shutdown(self) -> None:
        """Stop it as an outage would (SHUTDOWN NOSAVE) and wait until the process is gone."""
        with contextlib.suppress(redis.RedisError):
            self.client().shutdown(nosave=True)
        if self.proc is not None:
            self.proc.wait(timeout=20)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @classmethod
    @contextlib.contextmanager
    def running(cls, workdir: Path) -> Iterator[RedisServer]:
        server = cls(workdir)
        server.start()
        try:
            yield server
        finally:
            server.stop()


def postgres_bindir() -> Path:
    """The newest installed server binaries (Debian keeps them off PATH)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    initdb = found[-1] if found else shutil.which("initdb")
    if initdb is None:
        pytest.fail("initdb not found: install the PostgreSQL server package")
    return Path(initdb).resolve().parent


class PostgresCluster:
    """A Postgres cluster of our own (initdb in a temp dir, a free port, trust auth): tests may
    stop and start it. As root it runs as the `postgres` user, since initdb refuses root."""

    def __init__(self) -> None:
        self.bindir = postgres_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="compaas-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            self.as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> str:
        cmd = [*self.as_user, str(self.bindir / tool), *args]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=self.root)
        assert out.returncode == 0, f"{' '.join(cmd)}:\n{out.stdout}{out.stderr}"
        return out.stdout

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.root / "log")
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", log, "-o", options, "-w", "-t", "60", "start"
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def ready(self) -> bool:
        check = [str(self.bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)]
        return subprocess.run(check).returncode == 0

    def create_database(self) -> str:
        """A new database; its SQLAlchemy URL."""
        name = f"compaas_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(AssertionError):
                self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    @classmethod
    @contextlib.contextmanager
    def running(cls) -> Iterator[PostgresCluster]:
        cluster = cls()
        try:
            cluster.start()
            wait_for(cluster.ready, timeout=60)
            yield cluster
        finally:
            cluster.remove()


# ----------------------------------------------------------------------------- deployments


@dataclass
class Stack:
    """One deployment: database + broker + blob dir, an API client in this process and the
    worker processes it started (none for `api_stack`)."""

    name: str
    settings: Settings
    env: dict[str, str]
    client: TestClient
    worker_log: Path

    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_worker(self, queues: str | None = None, **env: str) -> subprocess.Popen[bytes]:
        """A real Celery worker process (its own process group, so tests can SIGKILL it all),
        consuming `queues` (default: the stack's worker queues and its inspection queue, as a
        deployment with one worker for both runs)."""
        if queues is None:
            both = [*self.settings.worker_queues.split(","), self.settings.inspection_queue]
            queues = ",".join(dict.fromkeys(both))
        log_path = self.worker_log.with_name(f"worker-{len(self.workers)}.log")
        log = log_path.open("w")
        worker = subprocess.Popen(
            worker_command(queues, 1, name=f"compaas-{len(self.workers)}"),
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
        return create_team(self.env, name)

    def upload(self, route: str, path: Path, headers: dict[str, str], **fields: str) -> Any:
        with path.open("rb") as fh:
            return self.client.post(
                f"/v1/{route}", files={"file": (path.name, fh)}, data=fields, headers=headers
            )

    def post_file(self, route: str, name: str, data: bytes, headers: dict[str, str]) -> Any:
        """Upload `data` as the `file` part, under the file name `name`."""
        return self.client.post(f"/v1/{route}", files={"file": (name, data)}, headers=headers)

    def inspect_here(self, model_id: str, headers: dict[str, str]) -> dict[str, Any]:
        """Inspect a pending model in this process with the worker's own code (which runs the
        sandbox child), as a worker would; the model as the API now shows it."""
        from app.storage import get_blob_store
        from worker.runner import inspect_model

        inspect_model(model_id, self.settings, get_blob_store(self.settings))
        return dict(self.client.get(f"/v1/models/{model_id}", headers=headers).json())

    def wait_model(self, model_id: str, headers: dict[str, str]) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            body = self.client.get(f"/v1/models/{model_id}", headers=headers).json()
            return body if body["status"] != "pending" else None

        return wait_for(done, timeout=120)

    def upload_ready(self, files: dict[str, Path], headers: dict[str, str]) -> dict[str, str]:
        """Upload `files` (`onnx` and `npz`, as `slow_mlp` writes them), have a worker of its
        own inspect the model, stop that worker; the model and dataset ids."""
        worker = self.start_worker()
        model = self.upload("models", files["onnx"], headers).json()
        assert self.wait_model(model["id"], headers)["status"] == "ready"
        dataset = self.upload("datasets", files["npz"], headers).json()
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=30)
        self.workers.remove(worker)
        return {"model_id": model["id"], "dataset_id": dataset["id"]}

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


def start_stack(name: str, env: dict[str, str], tmp: Path, workers: int = 1) -> Iterator[Stack]:
    """Migrate, serve the app in-process, start `workers` worker processes; stop them after."""
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
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """This session's own redis-server; the machine's Redis is never used."""
    with RedisServer.running(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def postgres_db() -> Iterator[str]:
    """A throwaway database on the machine's Postgres, dropped at the end of the session."""
    name = f"compaas_it_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_stack(
    postgres_db: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """Postgres + Redis + local blob dir, as in a production deployment."""
    tmp = tmp_path_factory.mktemp("pg-stack")
    env = {
        "COMPAAS_MODE": "embedded",
        "COMPAAS_DATA_DIR": str(tmp),
        "COMPAAS_DATABASE_URL": postgres_db,
        "COMPAAS_BROKER_URL": redis_url,
        **own_queues("it"),
        "COMPAAS_API_KEY_PEPPER": "integration-test-pepper",
        "COMPAAS_JOB_MEMORY_LIMIT_MB": "6144",
    }
    yield from start_stack("postgres", env, tmp)


def embedded_env(data_dir: Path) -> dict[str, str]:
    """The embedded default (`compaas up`): SQLite, local blobs, Celery's filesystem transport,
    all under `data_dir`."""
    return {
        "COMPAAS_MODE": "embedded",
        "COMPAAS_DATA_DIR": str(data_dir),
        "COMPAAS_DATABASE_URL": "",
        "COMPAAS_BROKER_URL": "",
        "COMPAAS_WORKER_QUEUES": "default",
        "COMPAAS_JOB_MEMORY_LIMIT_MB": "6144",
    }


@pytest.fixture(scope="session")
def sqlite_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The embedded default with a worker process."""
    tmp = tmp_path_factory.mktemp("sqlite-stack")
    yield from start_stack("sqlite", embedded_env(tmp), tmp)


@pytest.fixture(params=["postgres", "sqlite"])
def stack(request: pytest.FixtureRequest) -> Stack:
    """`pg_stack` or `sqlite_stack`: for the few tests where the backend matters, parametrized
    indirectly (`indirect=["stack"]`) with "postgres" and/or "sqlite"."""
    name = {"postgres": "pg_stack", "sqlite": "sqlite_stack"}[request.param]
    return request.getfixturevalue(name)


# ----------------------------------------------------------------------------- in-process API


@pytest.fixture(scope="session")
def api_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The embedded default served in this process, with no worker and no reconciler: no server
    to start, so tests/api is in the fast set. Created jobs stay queued; a model becomes ready
    or invalid through `Stack.inspect_here`."""
    tmp = tmp_path_factory.mktemp("api-stack")
    env = {**embedded_env(tmp), "COMPAAS_RUN_RECONCILER": "false"}
    yield from start_stack("api", env, tmp, workers=0)


@pytest.fixture(scope="session")
def api_team(api_stack: Stack) -> dict[str, str]:
    """The auth header of one team on `api_stack`."""
    return api_stack.new_team("api")[1]


@pytest.fixture(scope="session")
def api_other_team(api_stack: Stack) -> dict[str, str]:
    """A second team on `api_stack`: another team's objects are a 404 to it."""
    return api_stack.new_team("api-other")[1]


@pytest.fixture(scope="session")
def api_digits(
    api_stack: Stack, api_team: dict[str, str], digits_files: dict[str, Path]
) -> dict[str, dict[str, Any]]:
    """The digits CNN uploaded by `api_team` as .onnx and .pt2, inspected: the ready models."""
    ready = {}
    for fmt in ("onnx", "pt2"):
        resp = api_stack.upload("models", digits_files[fmt], api_team, name=f"digits-{fmt}")
        assert resp.status_code == 201, resp.text
        ready[fmt] = api_stack.inspect_here(resp.json()["id"], api_team)
        assert ready[fmt]["status"] == "ready", ready[fmt]
    return ready


# ----------------------------------------------------------------------------- engine runs


@pytest.fixture(scope="session", autouse=True)
def short_latency_window() -> Iterator[None]:
    """Engine runs in this process time each model for 0.1 s instead of 0.5 s (still at least
    50 runs, over a thousand on these small models). In-process tests check that latency is
    measured and reported consistently; the speed numbers the issues ask for are asserted
    through the worker, which measures with the defaults. The timing loops were a third of
    the fast set's time."""
    from engine.onnxgraph import metrics

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(metrics, "LATENCY_MIN_SECONDS", 0.1)
        yield


# ----------------------------------------------------------------------------- trained models


def built_once(
    tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], dict[str, Any]]
) -> dict[str, Any]:
    """`build(out_dir)` once per test run, not once per process: under pytest-xdist the workers
    share the directory of the run, and the first to get its lock builds while the others wait
    and reuse what it wrote (the builds are seeded, so any worker would write the same files).
    Paths in the result come back as Paths."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's directory, above each worker's own
    out = base / f"built-{name}"
    manifest = out / "built.json"
    with (base / f"built-{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not manifest.exists():
            result = build(out)
            paths = {k: str(v) for k, v in result.items() if isinstance(v, Path)}
            values = {k: v for k, v in result.items() if not isinstance(v, Path)}
            manifest.write_text(json.dumps({"paths": paths, "values": values}))
        built = json.loads(manifest.read_text())
    return {**built["values"], **{k: Path(v) for k, v in built["paths"].items()}}


@pytest.fixture(scope="session")
def digits_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The `compaas example digits` files: a CNN trained on sklearn's digits, exported twice."""
    from engine.examples import write_digits_example

    written = built_once(tmp_path_factory, "digits", write_digits_example)
    return {"pt2": written["pt2"], "onnx": written["onnx"], "npz": written["npz"]}


@pytest.fixture(scope="session")
def mlp_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The digits MLP 64-300-100-10 (flat [N, 64] inputs) as .pt2 and .onnx, and its .npz."""
    from engine.examples import write_digits_mlp

    written = built_once(tmp_path_factory, "mlp", write_digits_mlp)
    return {"pt2": written["pt2"], "onnx": written["onnx"], "npz": written["npz"]}


@pytest.fixture(scope="session")
def transformer(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 2-block transformer encoder trained on a token-order task (ONNX/.pt2 + tokens.npz)."""
    from engine.examples import write_token_transformer

    return built_once(tmp_path_factory, "transformer", write_token_transformer)


@pytest.fixture(scope="session")
def separable(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A depthwise-separable CNN trained on digits (ONNX/.pt2 + npz)."""
    from engine.examples import write_separable_cnn

    return built_once(tmp_path_factory, "separable", write_separable_cnn)
