"""What the tasks do: claim the row, fetch blobs, run the engine in the sandbox, persist results."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import update

from app.config import Settings
from app.db.base import utcnow
from app.db.models import Dataset, Job, JobStatus, Model, ModelStatus, StepStatus
from app.db.repositories import JobRepository
from app.db.session import session_scope
from app.services.models import EXTENSIONS
from app.storage import BlobStore
from worker import sandbox

log = logging.getLogger(__name__)

LEASE_S = 60
HEARTBEAT_S = 10
PROGRESS_WRITE_S = 0.5


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _workdir(settings: Settings, kind: str) -> Path:
    root = settings.tmp_dir / kind
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=root))


def inspect_model(model_id: str, settings: Settings, storage: BlobStore) -> str:
    """Inspect a pending model in the sandbox and mark it ready or invalid."""
    with session_scope(settings.database_url) as session:
        model = session.get(Model, model_id)
        if model is None or model.status != ModelStatus.pending:
            return "skipped"
        blob_key, ext = model.blob_key, EXTENSIONS[model.format]
    workdir = _workdir(settings, "inspect")
    try:
        path = workdir / f"model.{ext}"
        storage.get_to_path(blob_key, path)
        spec = {"action": "inspect_model", "model_path": str(path)}
        limits = sandbox.Limits(settings.inspect_time_limit_s, settings.job_memory_limit_mb)
        try:
            info = sandbox.run(spec, limits)
            values: dict[str, Any] = {
                "status": ModelStatus.ready,
                "inputs": info["inputs"],
                "outputs": info["outputs"],
                "params": info.get("params"),
                "opset": info.get("opset"),
                "format": info.get("format", model.format),
                "error": None,
            }
        except sandbox.SandboxError as exc:
            values = {
                "status": ModelStatus.invalid,
                "error": {"code": exc.code, "detail": exc.detail, "field": exc.field},
            }
        with session_scope(settings.database_url) as session:
            session.execute(
                update(Model)
                .where(Model.id == model_id, Model.status == ModelStatus.pending)
                .values(updated_at=utcnow(), **values)
            )
        return str(values["status"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class _JobProgress:
    """Relays engine events to the job row and its steps, fenced by the lease token."""

    def __init__(self, settings: Settings, job_id: str, token: int, n_steps: int) -> None:
        self.settings = settings
        self.job_id = job_id
        self.token = token
        self.n_steps = n_steps
        self.last_write = 0.0
        self.last_heartbeat = time.monotonic()
        self.lost = False

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        now = utcnow()
        with session_scope(self.settings.database_url) as session:
            repo = JobRepository(session)
            if kind == "step_started":
                repo.update_step(
                    self.job_id, event["index"], status=StepStatus.running, started_at=now
                )
                self._fenced(repo, current_step=event["index"])
            elif kind == "step_finished":
                repo.update_step(
                    self.job_id,
                    event["index"],
                    status=StepStatus.succeeded,
                    finished_at=now,
                    metrics=event.get("metrics"),
                    warnings=event.get("warnings") or None,
                )
            elif kind == "progress" and time.monotonic() - self.last_write >= PROGRESS_WRITE_S:
                self.last_write = time.monotonic()
                self._fenced(repo, progress=min(float(event.get("progress", 0.0)), 0.99))

    def _fenced(self, repo: JobRepository, **values: Any) -> None:
        values["lease_expires_at"] = utcnow() + timedelta(seconds=LEASE_S)
        if not repo.update_fenced(self.job_id, self.token, **values):
            self.lost = True

    def keep_going(self) -> bool:
        if time.monotonic() - self.last_heartbeat >= HEARTBEAT_S:
            self.last_heartbeat = time.monotonic()
            with session_scope(self.settings.database_url) as session:
                self._fenced(JobRepository(session))
        return not self.lost


def run_job(job_id: str, settings: Settings, storage: BlobStore) -> str:
    """Claim the job, run its pipeline in the sandbox, persist the results; finalize once."""
    with session_scope(settings.database_url) as session:
        repo = JobRepository(session)
        token = repo.claim(job_id, _owner(), utcnow() + timedelta(seconds=LEASE_S))
        if token is None:
            return "skipped"
        job = repo.get(job_id)
        assert job is not None
        model = session.get(Model, job.model_id) if job.model_id else None
        dataset = session.get(Dataset, job.dataset_id) if job.dataset_id else None
        team_id = job.team_id
        pipeline = [step.config for step in job.steps]
        evaluation_task = job.evaluation.get("task", "classification")
        export = list(job.export)
        model_ref = (model.blob_key, EXTENSIONS[model.format]) if model else None
        dataset_ref = (dataset.blob_key, dataset.format) if dataset else None

    if model_ref is None:
        _fail(settings, job_id, token, "model_deleted", "The job's model was deleted.")
        return "failed"
    workdir = _workdir(settings, "jobs")
    uploaded: list[str] = []
    try:
        model_path = workdir / f"model.{model_ref[1]}"
        storage.get_to_path(model_ref[0], model_path)
        dataset_path = None
        if dataset_ref is not None:
            dataset_path = workdir / f"dataset.{dataset_ref[1]}"
            storage.get_to_path(dataset_ref[0], dataset_path)
        spec = {
            "action": "compress",
            "model_path": str(model_path),
            "dataset_path": str(dataset_path) if dataset_path else None,
            "pipeline": pipeline,
            "evaluation_task": evaluation_task,
            "export": export,
            "workdir": str(workdir / "out"),
            "threads": settings.latency_threads,
            "memory_limit_mb": settings.job_memory_limit_mb,
        }
        (workdir / "out").mkdir()
        progress = _JobProgress(settings, job_id, token, len(pipeline))
        limits = sandbox.Limits(settings.job_time_limit_s, settings.job_memory_limit_mb)
        try:
            result = sandbox.run(
                spec, limits, on_event=progress, should_continue=progress.keep_going
            )
        except sandbox.SandboxAborted:
            log.warning("job %s: lease lost or job stopped; abandoning attempt %s", job_id, token)
            return "abandoned"
        except sandbox.SandboxError as exc:
            _fail(settings, job_id, token, exc.code, exc.detail, exc.field)
            return "failed"
        return _finalize(settings, storage, job_id, team_id, token, result, uploaded)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _finalize(
    settings: Settings,
    storage: BlobStore,
    job_id: str,
    team_id: str,
    token: int,
    result: dict[str, Any],
    uploaded: list[str],
) -> str:
    prefix = f"teams/{team_id}/jobs/{job_id}/attempt-{token}"
    by_sha: dict[str, dict[str, Any]] = {}
    planned: list[dict[str, Any]] = []
    for art in result["artifacts"]:
        planned.append({**art, "role": "final", "step_index": None})
        by_sha[art["sha256"]] = planned[-1]
    for step in result["steps"]:
        art = step.get("artifact")
        if art and art["sha256"] not in by_sha:
            planned.append({**art, "role": "checkpoint", "step_index": step["index"]})
            by_sha[art["sha256"]] = planned[-1]
    for i, art in enumerate(planned):
        name = f"final.{art['format']}" if art["role"] == "final" else f"step{art['step_index']}"
        key = f"{prefix}/{i}-{name}" if art["role"] != "final" else f"{prefix}/{name}"
        if art["role"] != "final":
            key += f".{art['format']}"
        storage.put_file(key, Path(art["path"]))
        uploaded.append(key)
        art["blob_key"] = key
    try:
        with session_scope(settings.database_url) as session:
            repo = JobRepository(session)
            warnings = list(result.get("warnings") or [])
            ok = repo.update_fenced(
                job_id,
                token,
                status=JobStatus.succeeded,
                progress=1.0,
                current_step=None,
                finished_at=utcnow(),
                lease_expires_at=None,
                metrics={
                    "original": result["original"],
                    "final": result["final"],
                    "ratios": result["ratios"],
                    "accuracy_measured": result.get("accuracy_measured", False),
                    "calibration_source": result.get("calibration_source"),
                },
                warnings=warnings,
                error=None,
            )
            if not ok:
                raise _LostLease()
            ids: dict[str, str] = {}
            for art in planned:
                row = repo.add_artifact(
                    team_id=team_id,
                    job_id=job_id,
                    step_index=art["step_index"],
                    role=art["role"],
                    format=art["format"],
                    blob_key=art["blob_key"],
                    size_bytes=art["size_bytes"],
                    sha256=art["sha256"],
                )
                ids[art["sha256"]] = row.id
            for step in result["steps"]:
                art = step.get("artifact")
                repo.update_step(
                    job_id,
                    step["index"],
                    status=StepStatus.succeeded,
                    metrics=step.get("metrics"),
                    warnings=step.get("warnings") or None,
                    artifact_id=ids.get(art["sha256"]) if art else None,
                )
    except _LostLease:
        log.warning("job %s: token %s is stale; discarding this attempt's artifacts", job_id, token)
        for key in uploaded:
            storage.delete(key)
        return "abandoned"
    return "succeeded"


class _LostLease(Exception):
    pass


def _fail(
    settings: Settings,
    job_id: str,
    token: int,
    code: str,
    detail: str,
    field: str | None = None,
) -> None:
    with session_scope(settings.database_url) as session:
        repo = JobRepository(session)
        job = session.get(Job, job_id)
        step_index = job.current_step if job else None
        repo.update_fenced(
            job_id,
            token,
            status=JobStatus.failed,
            finished_at=utcnow(),
            lease_expires_at=None,
            error={"code": code, "detail": detail, "field": field, "step": step_index},
        )
        if step_index is not None:
            repo.update_step(job_id, step_index, status=StepStatus.failed, finished_at=utcnow())
