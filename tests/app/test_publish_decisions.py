"""When the reconciler publishes a waiting row's message again (app.services.publishing.decide),
and what the broker is seen to hold (app.queue.waiting, on the filesystem transport here; the
Redis transport is read in tests/integration/test_reconcile_chaos.py)."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from app.config import Settings
from app.db.base import utcnow
from app.queue import (
    PRIORITY_FIRST,
    TASK_INSPECT_MODEL,
    TASK_RUN_JOB,
    Waiting,
    publish,
    waiting,
)
from app.services.publishing import Action, Rule, decide, inspection_rule, job_rule

NOW = utcnow()
JOB = (TASK_RUN_JOB, "job-1")
RULE = Rule(after_s=60, in_flight_s=60)
MODEL_RULE = Rule(after_s=60, in_flight_s=360, max_publishes=3)


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def test_a_row_never_published_is_published_whatever_the_broker_holds() -> None:
    assert decide(RULE, JOB, None, 0, NOW, None) is Action.publish
    assert decide(RULE, JOB, None, 0, NOW, Waiting(queued={JOB}, delivered={})) is Action.publish


def test_a_recent_publish_is_not_looked_for() -> None:
    assert decide(RULE, JOB, ago(59), 1, NOW, Waiting(delivered={})) is Action.wait


def test_a_naive_time_from_sqlite_counts_as_utc() -> None:
    naive = ago(59).replace(tzinfo=None)
    assert decide(RULE, JOB, naive, 1, NOW, Waiting(delivered={})) is Action.wait
    assert decide(RULE, JOB, naive - timedelta(2), 1, NOW, Waiting(delivered={})) is Action.publish


def test_a_message_still_queued_is_held_not_published_again() -> None:
    broker = Waiting(queued={JOB, (TASK_RUN_JOB, "other")}, delivered={})
    assert decide(RULE, JOB, ago(600), 1, NOW, broker) is Action.held


def test_a_message_missing_from_the_broker_is_lost() -> None:
    broker = Waiting(queued={(TASK_RUN_JOB, "other"), (TASK_INSPECT_MODEL, "job-1")}, delivered={})
    assert decide(RULE, JOB, ago(61), 1, NOW, broker) is Action.publish


def test_a_message_with_a_live_worker_is_held_with_a_dead_one_it_is_lost() -> None:
    assert decide(RULE, JOB, ago(300), 1, NOW, Waiting(delivered={JOB: 2.0})) is Action.held
    assert decide(RULE, JOB, ago(300), 1, NOW, Waiting(delivered={JOB: 61.0})) is Action.publish


def test_where_deliveries_cannot_be_seen_the_age_decides() -> None:
    """The filesystem transport keeps delivered messages in the worker's memory."""
    model = (TASK_INSPECT_MODEL, "m")
    blind = Waiting(delivered=None)
    assert decide(MODEL_RULE, model, ago(200), 1, NOW, blind) is Action.wait
    assert decide(MODEL_RULE, model, ago(400), 1, NOW, blind) is Action.publish
    assert decide(MODEL_RULE, model, ago(200), 1, NOW, None) is Action.wait
    assert decide(MODEL_RULE, model, ago(400), 1, NOW, None) is Action.publish


def test_an_inspection_lost_max_publishes_times_gives_up() -> None:
    model = (TASK_INSPECT_MODEL, "m")
    gone = Waiting(delivered={})
    assert decide(MODEL_RULE, model, ago(400), 2, NOW, gone) is Action.publish
    assert decide(MODEL_RULE, model, ago(400), 3, NOW, gone) is Action.give_up
    # still queued or with a live worker: never given up
    assert decide(MODEL_RULE, model, ago(400), 3, NOW, Waiting({model}, {})) is Action.held
    assert decide(MODEL_RULE, model, ago(400), 3, NOW, Waiting(delivered={model: 5})) is Action.held


def test_jobs_never_give_up_on_publishes() -> None:
    """A job's end is decided by its attempts (max_attempts), not by lost messages."""
    assert decide(RULE, JOB, ago(400), 50, NOW, Waiting(delivered={})) is Action.publish


def test_rules_follow_the_settings(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, requeue_after_s=7, inspect_time_limit_s=30, inspect_max_publishes=2
    )
    assert job_rule(settings) == Rule(after_s=7, in_flight_s=7)
    assert inspection_rule(settings) == Rule(after_s=7, in_flight_s=37, max_publishes=2)


def test_the_filesystem_broker_shows_what_its_folder_holds(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, worker_queues="cpu", gpu_queue="gpu")
    assert publish(settings, TASK_RUN_JOB, "a", queue="cpu")
    assert publish(settings, TASK_RUN_JOB, "b", queue="gpu", priority=PRIORITY_FIRST)
    assert publish(settings, TASK_INSPECT_MODEL, "m")
    assert publish(settings, TASK_RUN_JOB, "c", queue="elsewhere")  # not a published queue
    (settings.broker_dir / "queue" / "junk.cpu.msg").write_text("not json")
    found = waiting(settings)
    assert found is not None
    assert found.queued == {(TASK_RUN_JOB, "a"), (TASK_RUN_JOB, "b"), (TASK_INSPECT_MODEL, "m")}
    assert found.delivered is None  # a consumed message lives in the worker's memory


def test_an_inspection_is_published_to_the_inspection_queue(tmp_path: Path) -> None:
    """publish_inspection sends it to COMPAAS_INSPECT_QUEUE (not the job queue), records the
    publish on the model's row, and the reconciler's view of the broker sees it there."""
    from app.db.migrate import upgrade
    from app.db.models import Model, Team
    from app.db.session import session_scope
    from app.services.publishing import inspection_lost, publish_inspection

    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=tmp_path,
        worker_queues="cpu",
        inspect_queue="uploads",
    )
    upgrade(settings.database_url)
    with session_scope(settings.database_url) as session:
        team = Team(name="inspect-queue")
        session.add(team)
        session.flush()
        model = Model(
            team_id=team.id, name="m", format="onnx", size_bytes=1, blob_key="k", sha256="0" * 64
        )
        session.add(model)
        session.flush()
        model_id = model.id
        assert publish_inspection(session, settings, model_id)
    names = [p.name for p in (settings.broker_dir / "queue").iterdir()]
    assert len(names) == 1 and names[0].endswith(".uploads.msg"), names
    found = waiting(settings)
    assert found is not None and found.queued == {(TASK_INSPECT_MODEL, model_id)}
    with session_scope(settings.database_url) as session:
        row = session.get(Model, model_id)
        assert row is not None and row.publish_count == 1 and row.published_at is not None
    # a model whose inspection is lost names the queue a worker must consume
    assert "compaas worker --queues uploads" in inspection_lost(settings, 3)["detail"]
