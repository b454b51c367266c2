"""The cluster metrics /metrics computes from the database at scrape time, on a real SQLite
database (the Postgres dialect runs in tests/integration/test_ops_observability.py): duration
histograms from finished rows, sandbox kills, worker heartbeats, queue depth from the
filesystem broker; and the text they make parses with prometheus-client's own parser."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from app.db.base import utcnow
from app.db.migrate import upgrade
from app.db.models import Job, JobStep, Model, Team
from app.db.session import session_scope
from app.services import telemetry, worker_hosts
from app.services.telemetry import ClusterCollector


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        mode="embedded",
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'metrics.db'}",
        broker_url="",
        worker_queues="default",
    )
    upgrade(settings.database_url)
    return settings


def add_job(
    settings: Settings,
    status: str,
    seconds: float,
    steps: list[tuple[str, str, float]],
    ago: timedelta = timedelta(minutes=1),
) -> None:
    """A job that ran `seconds` and its steps (op, status, seconds), finished `ago`."""
    end = utcnow() - ago
    with session_scope(settings.database_url) as session:
        team = Team(name="t")
        session.add(team)
        session.flush()
        model = Model(
            team_id=team.id, name="m", format="onnx", size_bytes=1, sha256="0" * 64, blob_key="k"
        )
        session.add(model)
        session.flush()
        job = Job(
            team_id=team.id,
            model_id=model.id,
            status=status,
            evaluation={},
            export=[],
            created_at=end - timedelta(seconds=seconds + 2),
            started_at=end - timedelta(seconds=seconds),
            finished_at=end,
        )
        session.add(job)
        session.flush()
        for index, (op, step_status, took) in enumerate(steps):
            session.add(
                JobStep(
                    job_id=job.id,
                    index=index,
                    op=op,
                    config={"op": op},
                    status=step_status,
                    started_at=end - timedelta(seconds=took),
                    finished_at=end,
                )
            )


def scrape(settings: Settings) -> dict[str, Any]:
    body, content_type = telemetry.exposition(ClusterCollector(settings, cache_s=0))
    assert content_type.startswith("text/plain; version=0.0.4")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def samples(family: Any, suffix: str, **labels: str) -> dict[str, float]:
    return {
        s.labels.get("le", ""): s.value
        for s in family.samples
        if s.name == family.name + suffix and all(s.labels.get(k) == v for k, v in labels.items())
    }


def test_durations_come_from_finished_rows(settings: Settings) -> None:
    add_job(
        settings, "succeeded", 40.0, [("prune", "succeeded", 3.0), ("quantize", "succeeded", 30.0)]
    )
    add_job(settings, "failed", 8.0, [("quantize", "failed", 7.0)])
    add_job(settings, "queued", 0.0, [])  # not finished: started/finished are set but status is not
    families = scrape(settings)

    jobs = families["compaas_job_duration_seconds"]
    assert jobs.type == "histogram"
    ok = samples(jobs, "_bucket", status="succeeded")
    assert ok["30.0"] == 0 and ok["60.0"] == 1 and ok["+Inf"] == 1
    assert samples(jobs, "_count", status="succeeded") == {"": 1}
    assert samples(jobs, "_sum", status="succeeded")[""] == pytest.approx(40.0, abs=0.01)
    failed = samples(jobs, "_bucket", status="failed")
    assert failed["5.0"] == 0 and failed["10.0"] == 1
    assert not samples(jobs, "_count", status="queued")

    steps = families["compaas_job_step_duration_seconds"]
    quantize_ok = samples(steps, "_bucket", op="quantize", status="succeeded")
    assert quantize_ok["10.0"] == 0 and quantize_ok["30.0"] == 1
    assert samples(steps, "_bucket", op="prune", status="succeeded")["5.0"] == 1
    assert samples(steps, "_count", op="quantize", status="failed") == {"": 1}
    waits = families["compaas_job_queue_wait_seconds"]
    assert samples(waits, "_count") == {"": 3}
    assert samples(waits, "_bucket")["2.5"] == 3

    assert samples(families["compaas_jobs"], "", status="succeeded") == {"": 1}
    up = families["compaas_metrics_source_up"]
    assert samples(up, "", source="database") == {"": 1} and samples(up, "", source="broker") == {
        "": 1
    }


def test_sandbox_kills_heartbeats_and_queue_depth(settings: Settings) -> None:
    telemetry.record_sandbox_kill(settings, "memory")
    telemetry.record_sandbox_kill(settings, "memory")
    telemetry.record_sandbox_kill(settings, "seccomp")
    worker_hosts.record(settings, "host-a", {"seccomp": True})
    before = scrape(settings)["compaas_worker_last_seen_timestamp_seconds"]
    first_seen = samples(before, "", host="host-a")[""]
    assert worker_hosts.touch(settings, "host-a") is True
    assert worker_hosts.touch(settings, "unknown-host") is False
    queue = settings.broker_dir / "queue"
    queue.mkdir(parents=True, exist_ok=True)
    for n in range(3):
        (queue / f"{n:04d}_abc.default.msg").write_text("{}")
    (queue / "0009_abc.other.msg").write_text("{}")

    families = scrape(settings)
    kills = families["compaas_sandbox_kills"]
    assert kills.type == "counter"
    assert samples(kills, "_total", reason="memory") == {"": 2}
    assert samples(kills, "_total", reason="seccomp") == {"": 1}
    assert samples(kills, "_total", reason="time") == {"": 0}, "every known reason is exported"
    seen = samples(families["compaas_worker_last_seen_timestamp_seconds"], "", host="host-a")[""]
    assert seen >= first_seen and abs(seen - utcnow().timestamp()) < 60
    assert samples(families["compaas_queue_depth"], "", queue="default") == {"": 3}
    reclaimed = families["compaas_janitor_reclaimed_files"]
    assert samples(reclaimed, "_total", kind="orphan_blob") == {"": 0}, "the janitor names stay"


def test_an_unreachable_database_is_reported_not_raised(tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=tmp_path,
        database_url="postgresql+psycopg://nobody@127.0.0.1:1/none",
        broker_url="",
    )
    families = scrape(settings)
    up = families["compaas_metrics_source_up"]
    assert samples(up, "", source="database") == {"": 0}
    assert "compaas_jobs" not in families


def test_the_reading_is_cached(settings: Settings) -> None:
    collector = ClusterCollector(settings, cache_s=60)
    first = collector.reading()
    add_job(settings, "succeeded", 1.0, [])
    assert collector.reading() is first
    assert ClusterCollector(settings, cache_s=0).reading().jobs.get("succeeded") == 1


def test_settled_rows_are_read_once_and_stay_counted(settings: Settings) -> None:
    """Rows finished over SETTLE_S ago are aggregated once and kept by the collector; a scrape
    reads only newer ones. Deleting a settled job does not lower the counts (a counter never
    goes down), and a job finishing now adds to them."""
    add_job(settings, "succeeded", 5.0, [("quantize", "succeeded", 4.0)], ago=timedelta(hours=2))
    collector = ClusterCollector(settings, cache_s=0)
    first = collector.reading()
    assert first.job_durations[("succeeded",)].count == 1
    with session_scope(settings.database_url) as session:
        session.query(JobStep).delete()
        session.query(Job).delete()
    add_job(settings, "succeeded", 50.0, [("quantize", "succeeded", 40.0)])  # a minute ago
    second = collector.reading()
    durations = second.job_durations[("succeeded",)]
    assert durations.count == 2 and durations.total == pytest.approx(55.0, abs=0.01)
    assert second.step_durations[("quantize", "succeeded")].count == 2
    assert ClusterCollector(settings, cache_s=0).reading().job_durations[("succeeded",)].count == 1
