"""The janitor on a temp data dir (SQLite, local blobs): what it removes, what it must keep."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pytest

from app.config import Settings
from app.db.base import new_id, utcnow
from app.db.migrate import upgrade
from app.db.models import Job, JobStatus, Model, ModelStatus, OrphanBlob, Team
from app.db.repositories.janitor import JanitorRepository
from app.db.session import session_scope
from app.services import janitor
from app.storage.local import LocalBlobStore

GRACE_S = 60.0
DEADLINE_S = 30.0


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings(
        mode="embedded",
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'janitor.db'}",
        blob_backend="local",
        blob_dir=tmp_path / "blobs",
        orphan_blob_grace_s=GRACE_S,
        upload_deadline_s=DEADLINE_S,
        upload_idle_timeout_s=10,
        job_time_limit_s=100,
        inspect_time_limit_s=50,
    )
    upgrade(s.database_url)
    return s


@pytest.fixture
def store(settings: Settings) -> LocalBlobStore:
    assert settings.blob_dir is not None
    return LocalBlobStore(settings.blob_dir)


@pytest.fixture
def team(settings: Settings) -> str:
    with session_scope(settings.database_url) as session:
        row = Team(name="t")
        session.add(row)
        session.flush()
        return row.id


def put(store: LocalBlobStore, tmp: Path, key: str, size: int) -> None:
    src = tmp / f"src-{new_id()}"
    src.write_bytes(b"x" * size)
    store.put_file(key, src)


def add_model(settings: Settings, team: str, key: str, status: str = ModelStatus.ready) -> str:
    with session_scope(settings.database_url) as session:
        row = Model(team_id=team, name="m", format="onnx", size_bytes=1, sha256="0" * 64)
        row.blob_key, row.status = key, status
        session.add(row)
        session.flush()
        return row.id


def add_job(settings: Settings, team: str, status: str, token: int) -> str:
    with session_scope(settings.database_url) as session:
        row = Job(team_id=team, model_id=None, evaluation={}, export=[], status=status)
        row.lease_token = token
        session.add(row)
        session.flush()
        return row.id


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def metrics_totals(settings: Settings) -> dict[str, tuple[int, int]]:
    with session_scope(settings.database_url) as session:
        return JanitorRepository(session).reclaimed()


def test_stale_part_files_go_and_fresh_ones_stay(settings: Settings) -> None:
    settings.tmp_dir.mkdir(parents=True)
    stale = settings.tmp_dir / "upload-dead.part"
    stale.write_bytes(b"a" * 1000)
    age(stale, DEADLINE_S + 5)
    fresh = settings.tmp_dir / "upload-live.part"
    fresh.write_bytes(b"b" * 500)
    age(fresh, DEADLINE_S - 5)  # written to within the upload deadline: still in progress
    other = settings.tmp_dir / "notes.txt"  # not a spool file
    other.write_text("keep")
    age(other, DEADLINE_S * 10)

    reclaimed = janitor.sweep(settings)

    assert not stale.exists()
    assert fresh.exists() and other.exists()
    assert (reclaimed.files["upload_part"], reclaimed.bytes["upload_part"]) == (1, 1000)
    assert metrics_totals(settings)["upload_part"] == (1, 1000)
    again = janitor.sweep(settings)  # idempotent: nothing more to do
    assert again.total_bytes == 0
    assert metrics_totals(settings)["upload_part"] == (1, 1000)


def test_orphan_blob_is_listed_first_and_deleted_after_the_grace_period(
    settings: Settings, store: LocalBlobStore, team: str, tmp_path: Path
) -> None:
    owned = f"teams/{team}/models/{new_id()}/model.onnx"
    orphan = f"teams/{team}/models/{new_id()}/model.onnx"
    put(store, tmp_path, owned, 300)
    put(store, tmp_path, orphan, 700)
    add_model(settings, team, owned)
    t0 = utcnow()

    first = janitor.sweep(settings, store, now=t0)
    assert store.exists(orphan), "a blob without a row is only listed on the first pass"
    assert first.files["orphan_blob"] == 0 and first.watching == 1
    with session_scope(settings.database_url) as session:
        assert [r.key for r in session.query(OrphanBlob)] == [orphan]

    inside = janitor.sweep(settings, store, now=t0 + timedelta(seconds=GRACE_S - 1))
    assert store.exists(orphan) and inside.files["orphan_blob"] == 0

    after = janitor.sweep(settings, store, now=t0 + timedelta(seconds=GRACE_S))
    assert not store.exists(orphan)
    assert store.exists(owned), "a blob with a row is never deleted"
    assert (after.files["orphan_blob"], after.bytes["orphan_blob"]) == (1, 700)
    assert metrics_totals(settings)["orphan_blob"] == (1, 700)
    with session_scope(settings.database_url) as session:
        assert session.query(OrphanBlob).count() == 0

    later = janitor.sweep(settings, store, now=t0 + timedelta(seconds=3 * GRACE_S))
    assert later.total_bytes == 0 and store.exists(owned)


def test_a_candidate_that_gets_its_row_is_kept_and_forgotten(
    settings: Settings, store: LocalBlobStore, team: str, tmp_path: Path
) -> None:
    key = f"teams/{team}/models/{new_id()}/model.onnx"
    put(store, tmp_path, key, 100)
    t0 = utcnow()
    janitor.sweep(settings, store, now=t0)
    add_model(settings, team, key)  # the row commits after the first listing
    done = janitor.sweep(settings, store, now=t0 + timedelta(seconds=GRACE_S * 2))
    assert store.exists(key) and done.total_bytes == 0
    with session_scope(settings.database_url) as session:
        assert session.query(OrphanBlob).count() == 0


def test_a_candidate_deleted_by_someone_else_is_forgotten(
    settings: Settings, store: LocalBlobStore, team: str, tmp_path: Path
) -> None:
    key = f"teams/{team}/datasets/{new_id()}/data.npz"
    put(store, tmp_path, key, 100)
    t0 = utcnow()
    janitor.sweep(settings, store, now=t0)
    store.delete(key)
    janitor.sweep(settings, store, now=t0 + timedelta(seconds=1))
    with session_scope(settings.database_url) as session:
        assert session.query(OrphanBlob).count() == 0


def test_scratch_of_the_current_attempt_stays_and_every_other_goes(
    settings: Settings, team: str
) -> None:
    running = add_job(settings, team, JobStatus.running, token=2)
    finished = add_job(settings, team, JobStatus.succeeded, token=1)
    current = janitor.job_scratch(settings, running, 2)
    (current / "model.onnx").write_bytes(b"c" * 50)
    stale = janitor.job_scratch(settings, running, 1)  # the attempt token 2 took over from
    (stale / "model.onnx").write_bytes(b"s" * 400)
    over = janitor.job_scratch(settings, finished, 1)
    (over / "out").mkdir()
    (over / "out" / "final.onnx").write_bytes(b"o" * 600)
    deleted_job = janitor.job_scratch(settings, new_id(), 1)  # its row is gone
    old_unnamed = settings.tmp_dir / "jobs" / "tmpabc123"  # from before dirs were named
    old_unnamed.mkdir()
    age(old_unnamed, 2 * 100 + 10)
    young_unnamed = settings.tmp_dir / "jobs" / "tmpdef456"
    young_unnamed.mkdir()

    pending = add_model(settings, team, "k1", status=ModelStatus.pending)
    ready = add_model(settings, team, "k2", status=ModelStatus.ready)
    inspecting = janitor.inspect_scratch(settings, pending)
    inspected = janitor.inspect_scratch(settings, ready)
    (inspected / "model.onnx").write_bytes(b"i" * 30)

    reclaimed = janitor.sweep(settings)

    assert current.is_dir() and inspecting.is_dir() and young_unnamed.is_dir()
    for gone in (stale, over, deleted_job, old_unnamed, inspected):
        assert not gone.exists(), gone
    assert reclaimed.files["scratch_dir"] == 5
    assert reclaimed.bytes["scratch_dir"] == 400 + 600 + 30
    assert janitor.sweep(settings).files["scratch_dir"] == 0


def test_sweep_if_due_runs_once_per_interval(settings: Settings) -> None:
    settings.janitor_interval_s = 3600
    janitor._last_sweep.pop(settings.database_url, None)
    assert janitor.sweep_if_due(settings) is not None
    assert janitor.sweep_if_due(settings) is None
