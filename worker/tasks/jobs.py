from __future__ import annotations

from app.config import get_settings
from app.queue import TASK_RUN_JOB
from app.storage import get_blob_store
from worker import runner
from worker.celery_app import celery


@celery.task(name=TASK_RUN_JOB)
def run_job(job_id: str) -> str:
    """Run a compression job; a delivery that cannot claim the job does nothing."""
    settings = get_settings()
    return runner.run_job(job_id, settings, get_blob_store(settings))
