"""The Celery app the worker runs: configuration from app.queue, tasks from worker.tasks."""

from __future__ import annotations

from app.config import get_settings
from app.queue import make_celery

settings = get_settings()
celery = make_celery(settings)
celery.conf.update(
    include=["worker.tasks.models", "worker.tasks.jobs"],
    worker_max_tasks_per_child=100,
    task_time_limit=settings.job_time_limit_s + 300,
)
app = celery
