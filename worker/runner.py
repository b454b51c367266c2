"""What the tasks do: claim the row, fetch blobs, run the engine in the sandbox, persist results."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.config import Settings
from app.db.base import utcnow
from app.db.models import Dataset, Job, JobStatus, Model, ModelStatus, StepStatus
from app.db.repositories import JobRepository, ModelInspectionRepository
from app.db.repositories.events import JobEventRepository
from app.db.session import session_scope
from app.logs import bind, bind_more
from app.services import checkpoints, events, janitor, telemetry
from app.services.models import EXTENSIONS
from app.storage import BlobStore
from engine import quality
from engine.events import EventKind
from engine.recipe import library_versions
from engine.spec import CompressSpec, InspectSpec, Resume
from engine.torchgraph.device import DeviceSetting
from worker import outage, sandbox

log = logging.getLogger(__name__)
# ops-metrics: the engine's own log events, relayed from the sandbox child with the job's ids
engine_log = logging.getLogger("engine")

PROGRESS_WRITE_S = 0.5


def train_threads(settings: Settings) -> int:
    """The CPU threads a job's torch training gets: COMPAAS_TRAIN_THREADS when set (> 0), else
    the worker's OMP_NUM_THREADS when set, else every CPU this process may run on. The job's
    sandbox child runs with OMP_NUM_THREADS = latency_threads (for onnxruntime's measurements);
    training sets its own count, and a rerun with the same count gives the same model."""
    if settings.train_threads > 0:
        return settings.train_threads
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    return max(1, len(os.sched_getaffinity(0)))


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def inspect_model(model_id: str, settings: Settings, storage: BlobStore) -> str:
    """Inspect a pending model in the sandbox and mark it ready or invalid."""
    with bind(model_id=model_id):  # ops-metrics: on the inspection's log lines
        return _inspect_model(model_id, settings, storage)


def _inspect_model(model_id: str, settings: Settings, storage: BlobStore) -> str:
    with session_scope(settings.database_url) as session:
        model = ModelInspectionRepository(session).pending(model_id)
        if model is None:
            return "skipped"
        blob_key, ext = model.blob_key, EXTENSIONS[model.format]
    workdir = janitor.inspect_scratch(settings, model_id)
    try:
        path = workdir / f"model.{ext}"
        storage.get_to_path(blob_key, path)
        spec = InspectSpec(model_path=str(path))
        limits = sandbox.Limits(settings.inspect_time_limit_s, settings.job_memory_limit_mb)
        try:
            info = sandbox.run(spec, limits, workdir=workdir, require=settings.sandbox_requirements)
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
            _count_kill(settings, exc.reason)
            values = {
                "status": ModelStatus.invalid,
                "error": {"code": exc.code, "detail": exc.detail, "field": exc.field},
            }
        with session_scope(settings.database_url) as session:
            ModelInspectionRepository(session).record(model_id, **values)
        return str(values["status"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class _EventRelay:
    """Relays engine events to the job row, its steps and its event history, fenced by the token.

    Every write is one transaction that first renews the lease with `UPDATE jobs … WHERE
    lease_token = <ours> AND status = 'running'` and writes nothing else unless that matched: the
    row lock it takes holds off a concurrent claim until commit, so no step, event or artifact
    row of this attempt lands after another attempt claimed the job or it was canceled. Once the
    fence fails `lost` is set and the attempt is abandoned. Database errors are retried with
    backoff for as long as the lease lasts (a short Postgres restart costs no attempt).
    """

    def __init__(
        self, settings: Settings, storage: BlobStore, job_id: str, team_id: str, token: int
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.job_id = job_id
        self.team_id = team_id
        self.token = token
        self.last_write = 0.0
        self.last_heartbeat = time.monotonic()
        # Where our lease surely still holds: the claim (or last renewal) plus the lease.
        self.lease_until = time.monotonic() + settings.lease_s
        self.lost = False
        self.uploaded: list[str] = []
        self.checkpoints: dict[int, str] = {}

    def write(self, what: str, change: Callable[[Session], None], **job_values: Any) -> bool:
        """In one transaction: renew the lease and set `job_values` on the job while this
        attempt owns it, then `change(session)`; retried on database errors until the lease
        runs out. False (and `lost`) once the attempt no longer owns the job."""
        if self.lost:
            return False

        def transaction() -> bool:
            began = time.monotonic()
            with session_scope(self.settings.database_url) as session:
                values = {
                    "lease_expires_at": utcnow() + timedelta(seconds=self.settings.lease_s),
                    **job_values,  # finalize ends the lease
                }
                if not JobRepository(session).update_fenced(self.job_id, self.token, **values):
                    return False
                change(session)
            self.lease_until = began + self.settings.lease_s
            return True

        try:
            owned = outage.retry_until(
                transaction, self.lease_until, f"job {self.job_id} attempt {self.token}: {what}"
            )
        except outage.OutageOutlasted:
            log.warning(
                "job %s: lease of attempt %s ran out during an outage", self.job_id, self.token
            )
            owned = False
        if not owned:
            self.lost = True
        return owned

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == EventKind.STEP_FINISHED and event.get("artifact"):
            self._store_checkpoint(event)
        elif kind == EventKind.STEP_STARTED:
            index = event["index"]
            bind_more(step=index, op=event.get("op"))  # ops-metrics: on this attempt's log lines
            log.info("step %s (%s) started", index, event.get("op"))

            def started(session: Session) -> None:
                repo = JobRepository(session)
                repo.update_step(self.job_id, index, status=StepStatus.running, started_at=utcnow())
                events.record(session, self.job_id, "step", index=index, status="running")

            self.write("step started", started, current_step=index)
        elif kind == EventKind.STEP_FINISHED:
            self.write(
                "step finished",
                lambda session: self._finish_step(JobRepository(session), event, None),
            )
        elif kind == EventKind.PROGRESS and time.monotonic() - self.last_write >= PROGRESS_WRITE_S:
            self.last_write = time.monotonic()
            progress = round(min(float(event.get("progress", 0.0)), 0.99), 4)
            message = event.get("message")
            self.write(
                "progress",
                lambda session: events.record(
                    session, self.job_id, "progress", progress=progress, message=message
                ),
                progress=progress,
            )
        elif kind == EventKind.CANDIDATE:
            data = {k: v for k, v in event.items() if k != "type"}
            self.write(
                "candidate",
                lambda session: events.record(session, self.job_id, "candidate", **data),
            )
        elif kind == EventKind.ORIGINAL_MEASURED:
            self.write("original metrics", lambda _: None, metrics={"original": event["metrics"]})
        elif kind == EventKind.LOG:
            level, message = event.get("level", "info"), event.get("message")
            engine_log.log(_level(level), "%s", message)
            self.write(
                "log",
                lambda session: events.record(
                    session, self.job_id, "log", level=level, message=message
                ),
            )

    def _finish_step(
        self, repo: JobRepository, event: dict[str, Any], artifact_id: str | None
    ) -> None:
        repo.update_step(
            self.job_id,
            event["index"],
            status=StepStatus.succeeded,
            finished_at=utcnow(),
            metrics=event.get("metrics"),
            quality=event.get("quality"),
            warnings=event.get("warnings") or None,
            details=event.get("details") or None,
            artifact_id=artifact_id,
        )
        events.record(
            repo.session,
            self.job_id,
            "step",
            index=event["index"],
            status="succeeded",
            metrics=event.get("metrics"),
            quality=event.get("quality"),
        )

    def _store_checkpoint(self, event: dict[str, Any]) -> None:
        """Upload the step's output right away, so a retried job resumes after this step.

        The blob's key names this attempt, so no other attempt writes it; its row (which
        replaces any earlier checkpoint of the same step) is written under the fence. A blob
        whose row did not land is this attempt's alone and is removed when it is discarded."""
        if self.lost:
            return
        art = event["artifact"]
        index = event["index"]
        key = f"{_prefix(self.team_id, self.job_id, self.token)}/step{index}.{art['format']}"
        # Upload a copy: the engine reads this file as the next step's input while we store it.
        source = Path(art["path"])
        copy = source.with_name(f".upload-{source.name}")
        shutil.copyfile(source, copy)
        self.storage.put_file(key, copy)
        self.uploaded.append(key)
        replaced: list[str] = []

        def store(session: Session) -> None:
            repo = JobRepository(session)
            row, old = repo.replace_checkpoint(
                team_id=self.team_id,
                job_id=self.job_id,
                step_index=index,
                format=art["format"],
                blob_key=key,
                size_bytes=art["size_bytes"],
                sha256=art["sha256"],
                verdict=(event.get("quality") or {}).get("verdict"),
            )
            self.checkpoints[index] = row.id
            replaced[:] = old
            self._finish_step(repo, event, artifact_id=row.id)

        if self.write("checkpoint", store):
            for old_key in replaced:  # an earlier attempt's checkpoint of this step: superseded
                self.storage.delete(old_key)

    def keep_going(self) -> bool:
        """Heartbeat: renew the lease; False once the job was canceled or another owner took it."""
        if time.monotonic() - self.last_heartbeat >= self.settings.heartbeat_s:
            self.last_heartbeat = time.monotonic()
            self.write("heartbeat", lambda _: None)
        return not self.lost


def _prefix(team_id: str, job_id: str, token: int) -> str:
    """Where one attempt's blobs go: no other attempt writes under it."""
    return f"teams/{team_id}/jobs/{job_id}/attempt-{token}"


def run_job(job_id: str, settings: Settings, storage: BlobStore) -> str:
    """Claim the job, run its pipeline in the sandbox, persist the results; finalize once."""
    with bind(job_id=job_id):  # ops-metrics: its log lines; what the attempt binds ends here
        return _run_job(job_id, settings, storage)


def _run_job(job_id: str, settings: Settings, storage: BlobStore) -> str:
    claimed = _claim(job_id, settings, storage)
    if claimed is None:
        return "skipped"
    token, job = claimed
    bind_more(attempt=job.attempt, lease_token=token)  # ops-metrics: on this attempt's log lines
    log.info("job claimed: attempt %s, %d step(s)", job.attempt, len(job.pipeline))
    relay = _EventRelay(settings, storage, job_id, job.team_id, token)
    if job.model is None:
        _fail(relay, "model_deleted", "The job's model was deleted.")
        return "failed"
    workdir = janitor.job_scratch(settings, job_id, token)
    try:
        device = sandbox.device_for(settings.device)
        spec = _download(job, storage, workdir, settings, device)
        (workdir / "out").mkdir()
        limits = sandbox.Limits(
            settings.job_time_limit_s, settings.job_memory_limit_mb, gpu=device != "cpu"
        )
        try:
            result = sandbox.run(
                spec,
                limits,
                on_event=relay,
                should_continue=relay.keep_going,
                tick_s=min(1.0, settings.heartbeat_s),
                workdir=workdir,
                require=settings.sandbox_requirements,
            )
        except sandbox.SandboxAborted:
            _count_kill(settings, "aborted")
            log.warning("job %s: canceled or lease lost; abandoning attempt %s", job_id, token)
            _discard_unclaimed(relay)
            return "abandoned"
        except sandbox.SandboxError as exc:
            _count_kill(settings, exc.reason)
            _fail(relay, exc.code, exc.detail, exc.field)
            log.warning("job failed: %s: %s", exc.code, exc.detail)
            return "failed"
        outcome = _finalize(relay, result)
        log.info("job finished: %s", outcome)
        return outcome
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _level(name: Any) -> int:
    """A log level from an engine event's level name (info when unknown)."""
    value = logging.getLevelName(str(name).upper())
    return value if isinstance(value, int) else logging.INFO


def _count_kill(settings: Settings, reason: str | None) -> None:
    """ops-metrics: a sandbox child stopped by a limit or a signal (compaas_sandbox_kills)."""
    if reason is not None:
        telemetry.record_sandbox_kill(settings, reason)


@dataclass
class _Checkpoint:
    """The stored output of the last step a crashed attempt finished."""

    start_index: int  # the step to continue with
    blob_key: str
    format: str
    original_metrics: dict[str, Any]


@dataclass
class _ClaimedJob:
    """What a claimed job's row says to run: the request and the blobs it needs."""

    team_id: str
    attempt: int  # ops-metrics: the job's attempts count after this claim (log lines)
    model: tuple[str, str] | None  # (blob key, file extension); None once the model is deleted
    dataset: tuple[str, str] | None  # (blob key, file extension)
    dataset_id: str | None
    students: dict[str, str]  # model id -> blob key, for the models a step names
    checkpoint: _Checkpoint | None
    pipeline: list[dict[str, Any]]
    evaluation_task: str
    holdout: float | None
    floor: dict[str, float | None]
    allow_below_floor: bool
    export: list[str]
    seed: int
    # the auto search's candidates that earlier attempts finished (engine.ops.auto reuses them)
    search_history: list[dict[str, Any]]


def _claim(job_id: str, settings: Settings, storage: BlobStore) -> tuple[int, _ClaimedJob] | None:
    """Take the job's lease (None when another delivery holds it or it is done) and read it;
    database errors are retried for a lease's length."""
    return outage.retry_until(
        lambda: _claim_once(job_id, settings, storage),
        time.monotonic() + settings.lease_s,
        f"job {job_id}: claim",
    )


def _claim_once(
    job_id: str, settings: Settings, storage: BlobStore
) -> tuple[int, _ClaimedJob] | None:
    with session_scope(settings.database_url) as session:
        repo = JobRepository(session)
        token = repo.claim(job_id, _worker_id(), utcnow() + timedelta(seconds=settings.lease_s))
        if token is None:
            return None
        job = repo.get(job_id)
        assert job is not None
        events.record(session, job_id, "status", status="running", attempt=job.attempts)
        job.versions = library_versions()  # what this attempt runs with (the job's recipe)
        model = session.get(Model, job.model_id) if job.model_id else None
        dataset = session.get(Dataset, job.dataset_id) if job.dataset_id else None
        team_id = job.team_id
        pipeline = [step.config for step in job.steps]
        checkpoint = _resume_from(session, storage, repo, job)
        # Other models a step names (a distillation student), only from the job's own team.
        wanted = {
            str(s.config["student_model_id"]) for s in job.steps if s.config.get("student_model_id")
        }
        students = ModelInspectionRepository(session).blob_keys_of_team(team_id, wanted)
        history = (
            JobEventRepository(session).of_type(job_id, "candidate")
            if any(step.op == "auto" for step in job.steps)
            else []
        )
        return token, _ClaimedJob(
            team_id=team_id,
            attempt=job.attempts,
            model=(model.blob_key, EXTENSIONS[model.format]) if model else None,
            dataset=(dataset.blob_key, dataset.format) if dataset else None,
            dataset_id=dataset.id if dataset else None,
            students=students,
            checkpoint=checkpoint,
            pipeline=pipeline,
            evaluation_task=job.evaluation.get("task", "classification"),
            holdout=job.evaluation.get("holdout"),
            floor=job.evaluation.get("floor") or {},
            allow_below_floor=bool(job.evaluation.get("allow_below_floor", False)),
            export=list(job.export),
            seed=job.seed,
            search_history=history,
        )


def _download(
    job: _ClaimedJob,
    storage: BlobStore,
    workdir: Path,
    settings: Settings,
    device: DeviceSetting,
) -> CompressSpec:
    """Fetch the job's blobs into its directory; the spec the sandboxed engine runs."""
    assert job.model is not None
    model_path = workdir / f"model.{job.model[1]}"
    storage.get_to_path(job.model[0], model_path)
    dataset_path = None
    if job.dataset is not None:
        dataset_path = workdir / f"dataset.{job.dataset[1]}"
        storage.get_to_path(job.dataset[0], dataset_path)
    models: dict[str, str] = {}
    for model_id, key in job.students.items():
        path = workdir / f"student-{model_id}.pt2"
        storage.get_to_path(key, path)
        models[model_id] = str(path)
    resume = None
    if job.checkpoint is not None:
        saved = workdir / f"checkpoint.{job.checkpoint.format}"
        storage.get_to_path(job.checkpoint.blob_key, saved)
        resume = Resume(
            start_index=job.checkpoint.start_index,
            model_path=str(saved),
            original_metrics=job.checkpoint.original_metrics,
        )
    return CompressSpec(
        model_path=str(model_path),
        dataset_path=str(dataset_path) if dataset_path else None,
        dataset_id=job.dataset_id,
        pipeline=job.pipeline,
        evaluation_task=job.evaluation_task,
        holdout=job.holdout,
        floor=job.floor,
        allow_below_floor=job.allow_below_floor,
        models=models,
        export=job.export,
        seed=job.seed,
        workdir=str(workdir / "out"),
        latency_threads=settings.latency_threads,
        train_threads=train_threads(settings),
        device=device,
        resume=resume,
        search_history=job.search_history,
        time_limit_s=settings.job_time_limit_s,
        memory_limit_mb=settings.job_memory_limit_mb,
    )


def _resume_from(
    session: Session, storage: BlobStore, repo: JobRepository, job: Job
) -> _Checkpoint | None:
    """Continue after the last step whose checkpoint is still valid (its row and its file);
    the steps after it are run again, so they go back to pending (in the claim's transaction)."""
    point = checkpoints.resume_point(session, job, storage.exists)
    start = point.start_index if point else 0
    if any(s.index >= start and s.status != StepStatus.pending for s in job.steps):
        repo.reset_steps_from(job.id, start)
    if point is None:
        return None
    original = (job.metrics or {})["original"]
    return _Checkpoint(start, point.artifact.blob_key, point.artifact.format, original)


def _discard_unclaimed(relay: _EventRelay) -> None:
    """Remove the blobs this attempt uploaded that no artifact row names (cancel, lost lease).

    Keys name the attempt, so these blobs are its alone. A blob whose row committed while the
    attempt owned the job is kept: it is the job's now (a checkpoint a newer attempt or a
    retry resumes from). If the database cannot say, nothing is deleted (the janitor removes
    blobs that stay without a row)."""
    if not relay.uploaded:
        return

    def referenced() -> set[str]:
        with session_scope(relay.settings.database_url) as session:
            return JobRepository(session).referenced_keys(relay.job_id, relay.uploaded)

    try:
        kept = outage.retry_until(
            referenced,
            time.monotonic() + relay.settings.lease_s,
            f"job {relay.job_id} attempt {relay.token}: discard",
        )
    except outage.OutageOutlasted:
        log.warning(
            "job %s: database unreachable; left attempt %s's blobs", relay.job_id, relay.token
        )
        return
    for key in relay.uploaded:
        if key not in kept:
            relay.storage.delete(key)


def _finalize(relay: _EventRelay, result: dict[str, Any]) -> str:
    """Store the final artifacts and metrics; the job succeeds, or fails with
    quality_below_floor when the final result is under the floor (its metrics and artifacts,
    marked rejected, are kept). One fenced transaction: a stale attempt writes none of it and
    removes the files it uploaded."""
    job_id, team_id = relay.job_id, relay.team_id
    verdict = result.get("quality") or {}
    rejected = verdict.get("verdict") == "rejected"
    status = JobStatus.failed if rejected else JobStatus.succeeded
    error = None
    if rejected:
        error = {
            "code": "quality_below_floor",
            "detail": quality.rejected_detail(verdict),
            "field": "evaluation.floor",
            "step": None,
        }
    finals = []
    for art in result["artifacts"]:
        key = f"{_prefix(team_id, job_id, relay.token)}/final.{art['format']}"
        relay.storage.put_file(key, Path(art["path"]))
        relay.uploaded.append(key)
        finals.append({**art, "blob_key": key})

    def record(session: Session) -> None:
        repo = JobRepository(session)
        final_ids = []
        for art in finals:
            row = repo.add_artifact(
                team_id=team_id,
                job_id=job_id,
                step_index=None,
                role="final",
                format=art["format"],
                blob_key=art["blob_key"],
                size_bytes=art["size_bytes"],
                sha256=art["sha256"],
                verdict=verdict.get("verdict"),
            )
            final_ids.append(row.id)
        last_index = max((s["index"] for s in result["steps"]), default=None)
        for step in result["steps"]:
            if step["index"] in relay.checkpoints:
                continue
            repo.update_step(
                job_id,
                step["index"],
                status=StepStatus.succeeded,
                finished_if_open=utcnow(),  # ops-metrics: its duration (/metrics)
                metrics=step.get("metrics"),
                quality=step.get("quality"),
                warnings=step.get("warnings") or None,
                details=step.get("details") or None,
                artifact_id=final_ids[0] if step["index"] == last_index and final_ids else None,
            )
        events.record(
            session,
            job_id,
            "status",
            status=str(status),
            ratios=result["ratios"],
            quality=verdict or None,
            **({"error": error} if error else {}),
        )
        events.record(session, job_id, events.TERMINAL_EVENT, status=str(status))

    owned = relay.write(
        "finalize",
        record,
        status=status,
        progress=1.0,
        current_step=None,
        finished_at=utcnow(),
        lease_expires_at=None,
        metrics={
            "original": result["original"],
            "final": result["final"],
            "ratios": result["ratios"],
            "compression_basis": result.get("compression_basis", "onnx"),
            "accuracy_measured": result.get("accuracy_measured", False),
            "calibration_source": result.get("calibration_source"),
            "evaluation": result.get("evaluation"),
            "latency_side_by_side": result.get("latency_side_by_side"),
        },
        quality=verdict or None,
        warnings=list(result.get("warnings") or []),
        error=error,
    )
    if not owned:
        log.warning(
            "job %s: token %s is stale; discarding this attempt's files", job_id, relay.token
        )
        _discard_unclaimed(relay)
        return "abandoned"
    return str(status)


def _fail(relay: _EventRelay, code: str, detail: str, field: str | None = None) -> None:
    """The job fails with this error, at the step it was on, if this attempt still owns it."""

    def record(session: Session) -> None:
        repo = JobRepository(session)
        job = session.get(Job, relay.job_id)
        step_index = job.current_step if job else None
        error = {"code": code, "detail": detail, "field": field, "step": step_index}
        if job is not None:
            job.error = error
        if step_index is not None:
            repo.update_step(
                relay.job_id, step_index, status=StepStatus.failed, finished_at=utcnow()
            )
        events.record(session, relay.job_id, "status", status="failed", error=error)
        events.record(session, relay.job_id, events.TERMINAL_EVENT, status="failed")

    relay.write(
        "fail", record, status=JobStatus.failed, finished_at=utcnow(), lease_expires_at=None
    )
    _discard_unclaimed(relay)
