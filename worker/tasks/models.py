from __future__ import annotations

from app.config import get_settings
from app.queue import TASK_INSPECT_MODEL
from app.storage import get_blob_store
from worker import runner
from worker.celery_app import celery


@celery.task(name=TASK_INSPECT_MODEL)
def inspect_model(model_id: str) -> str:
    """Inspect an uploaded model in the sandbox; idempotent (only pending models are touched)."""
    settings = get_settings()
    return runner.inspect_model(model_id, settings, get_blob_store(settings))
