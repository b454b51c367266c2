"""After kill -9 of a real API process mid-upload, and a blob stored without its row (a kill
between moving the blob and committing the row), the janitor leaves 0 orphan bytes after one
grace period, and never deletes a blob that has a row or a `.part` still being written.

The API runs as its own uvicorn process on a Postgres cluster of this module's own; the
janitor runs from the reconciler loop's body (reconcile_once) with a short grace period."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.db.base import new_id
from app.db.models import Artifact, Dataset, Model
from app.db.session import session_scope
from app.services import janitor
from app.services.reconciler import reconcile_once
from app.storage.local import LocalBlobStore
from tests.conftest import settings_from
from tests.integration.conftest import (
    PostgresCluster,
    RedisServer,
    Stack,
    slow_mlp,
    start_stack,
    wait_for,
)
from tests.security.uploads_support import (
    Server,
    api_server,
    multipart_head,
    multipart_tail,
    read_status,
    request_head,
)

pytestmark = pytest.mark.integration

DEADLINE_S = 8.0  # the upload timeout: a .part not written to for this long is dead
GRACE_S = 3.0  # a blob without a row for this long is deleted
CHUNK = 64 * 1024
# The live upload starts DEADLINE_S - 3 s after the kill and the janitor passes over it
# DEADLINE_S + 0.5 s after: it is then ~4 s old, well inside its own deadline.


@pytest.fixture(scope="module")
def janitor_pg() -> Iterator[PostgresCluster]:
    with PostgresCluster.running() as cluster:
        yield cluster


@pytest.fixture
def janitor_db(janitor_pg: PostgresCluster) -> str:
    return janitor_pg.create_database()


def onnx_bytes(path: Path, weights: int = 256) -> bytes:
    """A valid ONNX model (X @ W) with a weights×weights float initializer."""
    w = numpy_helper.from_array(np.ones((weights, weights), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, weights])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, weights])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path.read_bytes()


def settings_of(server: Server) -> object:
    return settings_from({k: v for k, v in server.env.items() if k.startswith("COMPAAS_")})


def store_of(server: Server) -> LocalBlobStore:
    return LocalBlobStore(server.data_dir / "blobs")


def blobs_with_rows(server: Server) -> set[str]:
    with session_scope(server.database_url) as session:
        keys: set[str] = set()
        for table in (Model, Dataset, Artifact):
            keys |= {row.blob_key for row in session.query(table)}
        return keys


def orphan_bytes(server: Server) -> int:
    """Bytes in the blob store no row points at, plus every upload spool file."""
    owned = blobs_with_rows(server)
    blobs = sum(size for key, size in store_of(server).iter_blobs() if key not in owned)
    return blobs + sum(p.stat().st_size for p in server.spool_files())


class SlowUpload:
    """A raw-socket model upload that keeps writing chunks until told to finish."""

    def __init__(self, server: Server, headers: dict[str, str], body: bytes) -> None:
        self.head = multipart_head("live.onnx")
        self.body = body
        self.tail = multipart_tail()
        length = len(self.head) + len(body) + len(self.tail)
        self.sock = socket.create_connection(("127.0.0.1", server.port))
        self.sock.sendall(request_head("/v1/models", headers, length) + self.head)
        self.finish = threading.Event()
        self.status: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sent = 0
        # Trickle the file (8 KiB every 0.2 s) until told to finish.
        while not self.finish.is_set() and sent < len(self.body) - CHUNK:
            self.sock.sendall(self.body[sent : sent + CHUNK // 8])
            sent += CHUNK // 8
            self.finish.wait(0.2)
        self.sock.sendall(self.body[sent:] + self.tail)
        self.status = read_status(self.sock, timeout=20)
        self.sock.close()


def test_the_janitor_leaves_no_orphan_bytes_after_kills(
    tmp_path: Path, janitor_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = {
        "database_url": janitor_db,
        "run_reconciler": "false",  # the janitor runs here, when the test says so
        "upload_deadline_s": str(DEADLINE_S),
        "upload_idle_timeout_s": "4",
        "orphan_blob_grace_s": str(GRACE_S),
        "janitor_interval_s": "0",
    }
    model = onnx_bytes(tmp_path / "m.onnx")

    # 1. A real upload (blob + row), then kill -9 of the API in the middle of a second one.
    with api_server(tmp_path, **config) as first:
        team, headers = first.new_team("janitor")
        with (tmp_path / "m.onnx").open("rb") as fh:
            done = httpx.post(
                f"{first.base_url}/v1/models", files={"file": ("m.onnx", fh)}, headers=headers
            )
        assert done.status_code == 201, done.text
        sock = socket.create_connection(("127.0.0.1", first.port))
        head = multipart_head("big.onnx")
        sock.sendall(request_head("/v1/models", headers, len(head) + 4 * len(model) + 100) + head)
        sock.sendall(model * 2)
        wait_for(lambda: sum(p.stat().st_size for p in first.spool_files()) >= len(model), 20)
        os.killpg(first.process.pid, signal.SIGKILL)
        first.process.wait(timeout=10)
        killed_at = time.time()
        sock.close()
        dead_parts = first.spool_files()
        assert len(dead_parts) == 1
        dead_part_bytes = dead_parts[0].stat().st_size

    # 2. A blob moved into the store whose row never committed (the API died in between).
    store = store_of(first)
    orphan_key = f"teams/{team}/models/{new_id()}/model.onnx"
    (tmp_path / "orphan").write_bytes(model)
    store.put_file(orphan_key, tmp_path / "orphan")

    with api_server(tmp_path, **config) as api:
        settings = settings_of(api)
        owned_before = blobs_with_rows(api)
        assert len(owned_before) == 1, "the finished upload has its blob and row"

        # First pass: the orphan is only listed.
        reconcile_once(settings)  # type: ignore[arg-type]
        listed_at = time.time()
        assert store.exists(orphan_key)

        # An upload in progress on the new API process, younger than the upload timeout.
        wait_for(lambda: time.time() >= killed_at + DEADLINE_S - 3, timeout=30)
        live = SlowUpload(api, headers, onnx_bytes(tmp_path / "live.onnx", weights=512))
        try:
            wait_for(lambda: api.spool_files() and api.spool_files() != dead_parts, 10)
            live_part = next(p for p in api.spool_files() if p not in dead_parts)
            late_key = f"teams/{team}/datasets/{new_id()}/data.npz"  # within its grace period
            (tmp_path / "late").write_bytes(b"z" * 1000)
            store.put_file(late_key, tmp_path / "late")
            # One grace period after the listing, and past the upload timeout of the dead part.
            wait_for(
                lambda: time.time() >= max(listed_at + GRACE_S, killed_at + DEADLINE_S + 0.5),
                timeout=30,
            )
            late_listed_at = time.time()
            reconcile_once(settings)  # type: ignore[arg-type]
            assert live_part.exists(), "a .part still being written was deleted"
            assert not any(p.exists() for p in dead_parts), "the dead upload's .part is left"
            assert not store.exists(orphan_key), "the orphan blob outlived its grace period"
            assert store.exists(late_key), "a blob inside its grace period was deleted"
            for key in owned_before:
                assert store.exists(key), "a blob with a row was deleted"
        finally:
            live.finish.set()
            live.thread.join(timeout=30)
        assert live.status == 201, "the upload the janitor saw in progress did not complete"

        # The late orphan goes one grace period after it was listed; nothing with a row does.
        wait_for(lambda: time.time() >= late_listed_at + GRACE_S + 0.5, timeout=30)
        reconcile_once(settings)  # type: ignore[arg-type]
        reconcile_once(settings)  # type: ignore[arg-type]
        assert orphan_bytes(api) == 0
        owned_after = blobs_with_rows(api)
        assert len(owned_after) == 2 and owned_before < owned_after
        assert all(store.exists(key) for key in owned_after)

        metrics = scraped(httpx.get(f"{api.base_url}/metrics").text)
        reclaimed_bytes = "compaas_janitor_reclaimed_bytes_total"
        assert metrics[(reclaimed_bytes, "upload_part")] == dead_part_bytes
        assert metrics[(reclaimed_bytes, "orphan_blob")] == len(model) + 1000
        assert metrics[("compaas_janitor_reclaimed_files_total", "orphan_blob")] == 2
        assert metrics[("compaas_janitor_orphan_candidates", "")] == 0


# ----------------------------------------------------------------------------- killed worker


@pytest.fixture(scope="module")
def worker_stack(
    tmp_path_factory: pytest.TempPathFactory, janitor_pg: PostgresCluster
) -> Iterator[Stack]:
    """Short leases; the API's reconciler thread runs every second with the janitor on every
    pass; workers are started by the test."""
    tmp = tmp_path_factory.mktemp("janitor-stack")
    with RedisServer.running(tmp_path_factory.mktemp("janitor-redis")) as redis_server:
        env = {
            "COMPAAS_MODE": "embedded",
            "COMPAAS_DATA_DIR": str(tmp),
            "COMPAAS_DATABASE_URL": janitor_pg.create_database(),
            "COMPAAS_BROKER_URL": redis_server.url,
            "COMPAAS_WORKER_QUEUES": f"janitor-{uuid.uuid4().hex[:8]}",
            "COMPAAS_LEASE_S": "6",
            "COMPAAS_HEARTBEAT_S": "1",
            "COMPAAS_REQUEUE_AFTER_S": "4",
            "COMPAAS_RECONCILE_INTERVAL_S": "1",
            "COMPAAS_RUN_RECONCILER": "true",
            "COMPAAS_JANITOR_INTERVAL_S": "0",
            "COMPAAS_JOB_MEMORY_LIMIT_MB": "6144",
        }
        yield from start_stack("janitor", env, tmp, workers=0)


def test_a_killed_workers_scratch_goes_and_the_current_attempts_stays(
    worker_stack: Stack, tmp_path: Path
) -> None:
    stack = worker_stack
    _, team = stack.new_team("scratch")
    files = slow_mlp(tmp_path, width=1024)  # static int8: a few seconds
    worker = stack.start_worker()
    model = stack.upload("models", files["onnx"], team).json()
    assert stack.wait_model(model["id"], team)["status"] == "ready"
    dataset = stack.upload("datasets", files["npz"], team).json()
    body = {
        "model_id": model["id"],
        "dataset_id": dataset["id"],
        "pipeline": [
            {"op": "quantize", "mode": "static", "dtype": "int8", "calibration": {"samples": 1000}}
        ],
        "evaluation": {"task": "generic"},
    }
    created = stack.client.post("/v1/jobs", json=body, headers=team)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    scratch = stack.settings.tmp_dir / "jobs"

    def attempt_dirs(token: int) -> list[Path]:
        return sorted(scratch.glob(f"{job_id}.attempt-{token}.*"))

    first = wait_for(lambda: attempt_dirs(1), timeout=60, interval=0.1)
    time.sleep(1.5)  # into the step
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    stack.workers.remove(worker)
    assert all(d.exists() for d in first), "the killed attempt's scratch is there after the kill"

    # Once the lease expires the job goes back to queued: that attempt is over, and the
    # janitor (on the reconciler's next pass) removes its scratch.
    wait_for(lambda: not any(d.exists() for d in first), timeout=30, interval=0.2)
    stack.start_worker()
    second = wait_for(lambda: attempt_dirs(2), timeout=60, interval=0.1)
    # A pass while the second attempt runs keeps its scratch (the reconciler thread's passes
    # run meanwhile too).
    before = stack.client.get(f"/v1/jobs/{job_id}", headers=team).json()
    janitor.sweep(stack.settings)
    after = stack.client.get(f"/v1/jobs/{job_id}", headers=team).json()
    assert before["status"] == after["status"] == "running", "the job ended too soon to check"
    assert all(d.exists() for d in second), "the current attempt's scratch was removed"
    done = stack.wait_job(job_id, team, timeout=120)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    assert not any(scratch.iterdir()), "scratch left after the job finished"
    metrics = scraped(stack.client.get("/metrics").text)
    assert metrics[("compaas_janitor_reclaimed_files_total", "scratch_dir")] == 1


def scraped(text: str) -> dict[tuple[str, str], float]:
    """/metrics parsed by prometheus-client: (sample name, its `kind` label) → value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, sample.labels.get("kind", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
