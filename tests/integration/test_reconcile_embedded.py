"""The embedded deployment (`compaas up`: SQLite, Celery's filesystem transport) reconciles too:
a message file still in the queue folder is left alone, a lost one is published again."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.db.models import Model
from app.db.session import session_scope
from app.queue import TASK_INSPECT_MODEL, waiting
from app.services.reconciler import reconcile_once
from tests.integration.conftest import Stack, start_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`compaas up`'s settings with a 1 s publish age and no reconciler thread: the test runs
    the passes itself; no worker until it starts one."""
    tmp = tmp_path_factory.mktemp("rc-embedded")
    env = {
        "COMPAAS_MODE": "embedded",
        "COMPAAS_DATA_DIR": str(tmp),
        "COMPAAS_DATABASE_URL": "",
        "COMPAAS_BROKER_URL": "",
        "COMPAAS_WORKER_QUEUES": "default",
        "COMPAAS_REQUEUE_AFTER_S": "1",
        "COMPAAS_INSPECT_TIME_LIMIT_S": "60",
        "COMPAAS_RUN_RECONCILER": "false",
    }
    yield from start_stack("embedded", env, tmp, workers=0)


def _publishes(stack: Stack, model_id: str) -> int:
    with session_scope(stack.settings.database_url) as session:
        model = session.get(Model, model_id)
        assert model is not None
        return model.publish_count


def test_the_folder_is_read_and_a_lost_inspection_is_published_again(
    embedded: Stack, digits_files: dict[str, Path]
) -> None:
    import time

    _, headers = embedded.new_team("embedded")
    model_id = embedded.upload("models", digits_files["onnx"], headers).json()["id"]
    ref = (TASK_INSPECT_MODEL, model_id)
    found = waiting(embedded.settings)
    assert found is not None and ref in found.queued
    time.sleep(1.5)
    assert reconcile_once(embedded.settings)["inspections_published"] == 0  # still in the folder
    assert _publishes(embedded, model_id) == 1

    folder = embedded.settings.broker_dir / "queue"
    for message in folder.glob(f"*.{embedded.settings.inspection_queue}.msg"):
        message.unlink()  # lost
    time.sleep(1.5)
    # The folder cannot show a message a worker took: it waits out the inspection time limit.
    assert reconcile_once(embedded.settings)["inspections_published"] == 0
    settings = embedded.settings.model_copy(update={"inspect_time_limit_s": 0})
    assert reconcile_once(settings)["inspections_published"] == 1
    assert _publishes(embedded, model_id) == 2
    found = waiting(embedded.settings)
    assert found is not None and ref in found.queued

    embedded.start_worker()
    assert embedded.wait_model(model_id, headers)["status"] == "ready"
