"""Jobs: validate the request against the model and dataset, record it, commit, then enqueue."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from app.config import Settings
from app.db.models import (
    Artifact,
    Dataset,
    Job,
    JobStatus,
    Model,
    ModelStatus,
)
from app.db.repositories import JobRepository, Page, TeamJobRepository, TeamRepository
from app.errors import Conflict, Invalid, LimitReached, not_found
from app.schemas.jobs import ArtifactRead, JobCreate, JobRead, JobStepRead
from app.services import checkpoints, events, idempotency, publishing, recipes, uploaded
from app.services.common import page_or_422
from app.services.datasets import DATASETS
from app.services.idempotency import IdempotentRequest
from app.services.models import MODELS
from engine.config import (
    OpConfig,
    PipelineError,
    auto_step,
    parse_steps,
    preset_pipeline,
    validate_request,
)
from engine.io.datasets import DatasetMismatch, arrays_for_inputs
from engine.io.formats import TensorSpec
from engine.quality import FLOOR_KEYS, FloorError, check_floor, step_warnings


def _repo(session: Session, team_id: str) -> TeamJobRepository:
    return TeamJobRepository(session, team_id)


def _problem(exc: PipelineError | DatasetMismatch) -> Invalid:
    """The 422 for a request the engine refuses, with its code, field and extra members.

    A step that needs the torch model of a non-.pt2 upload is `unsupported_op` to the engine;
    the API has always answered it as a pipeline the request cannot run: `invalid_pipeline`.
    """
    if isinstance(exc, DatasetMismatch):
        return Invalid(exc.code, exc.detail, field=exc.field, input=exc.input)
    code = "invalid_pipeline" if exc.code == "unsupported_op" else exc.code
    return Invalid(code, exc.detail, field=exc.field, **exc.extra)


AUTO_FIELDS = ("budget", "objective", "search")


def _resolve_pipeline(body: JobCreate, max_steps: int) -> list[OpConfig]:
    if (body.preset is None) == (body.pipeline is None):
        raise Invalid(
            "validation_error",
            "Give either 'preset' (see GET /v1/presets) or 'pipeline' (a list of ops), not both "
            "and not neither.",
            field="pipeline",
        )
    if body.overrides and body.preset is None:
        raise Invalid(
            "validation_error",
            "'overrides' changes a preset's steps; with an explicit 'pipeline', put the "
            "values in the steps themselves.",
            field="overrides",
        )
    auto_fields = [n for n in AUTO_FIELDS if getattr(body, n) is not None]
    if body.preset == "auto" and body.overrides:
        raise Invalid(
            "validation_error",
            "preset 'auto' takes 'budget', 'objective' and 'search', not 'overrides': it "
            "chooses every op's settings itself.",
            field="overrides",
        )
    if auto_fields and body.preset != "auto":
        raise Invalid(
            "validation_error",
            f"'{auto_fields[0]}' goes with preset 'auto' (a search for the best model within "
            'a budget); add "preset": "auto", or leave it out.',
            field=auto_fields[0],
        )
    try:
        if body.preset == "auto":
            steps = [auto_step(body.budget, body.objective, body.search)]
        else:
            steps = (
                preset_pipeline(body.preset, body.overrides)
                if body.preset is not None
                else body.pipeline or []
            )
        if not steps:
            raise Invalid("invalid_pipeline", "The pipeline has no ops.", field="pipeline")
        if len(steps) > max_steps:
            raise Invalid(
                "pipeline_too_long",
                f"The pipeline has {len(steps)} steps; at most {max_steps} are allowed. Combine "
                "steps (one gradual prune instead of many one-shot ones) or run several jobs.",
                field="pipeline",
                max_steps=max_steps,
            )
        return parse_steps(steps)
    except PipelineError as exc:
        raise _problem(exc) from exc


def check_dataset_fits(model: Model, dataset: Dataset) -> None:
    """Every model input needs an array of matching rank and fixed dims; say which does not."""
    inputs = [TensorSpec(s["name"], tuple(s["shape"]), s["dtype"]) for s in model.inputs or []]
    shapes = {name: array["shape"] for name, array in dataset.arrays.items()}
    try:
        arrays_for_inputs(inputs, shapes)
    except DatasetMismatch as exc:
        raise _problem(exc) from exc


def create(
    session: Session,
    settings: Settings,
    team_id: str,
    body: JobCreate,
    idem: IdempotentRequest | None = None,
) -> Job:
    recipe_versions = None
    if body.recipe is not None:
        body, recipe_versions = recipes.job_request(session, team_id, body)
    if body.model_id is None:
        raise Invalid(
            "validation_error",
            "Give 'model_id' (POST /v1/models uploads a model; GET /v1/models lists yours), or "
            "a 'recipe' from GET /v1/jobs/{id}/recipe.",
            field="model_id",
        )
    model = uploaded.get_or_raise(session, MODELS, team_id, body.model_id)
    if model.status == ModelStatus.pending:
        raise Conflict(
            "model_not_ready",
            "The model is still being inspected; poll GET /v1/models/{id} until status is "
            "'ready', then create the job.",
            field="model_id",
            retry_after=2,
        )
    if model.status == ModelStatus.invalid:
        err = (model.error or {}).get("detail", "")
        raise Invalid("model_invalid", f"The model failed inspection: {err}", field="model_id")
    dataset = None
    if body.dataset_id is not None:
        dataset = uploaded.get_or_raise(session, DATASETS, team_id, body.dataset_id)
        check_dataset_fits(model, dataset)
    _check_floor(body)
    configs = _resolve_pipeline(body, settings.max_pipeline_steps)
    check_active_jobs(session, settings, team_id)
    _check_plan(model.format, configs, dataset, body)
    _check_students(session, team_id, configs)
    jobs = _repo(session, team_id)
    job = jobs.create(
        model_id=model.id,
        dataset_id=dataset.id if dataset else None,
        status=JobStatus.queued,
        preset=body.preset,
        evaluation=body.evaluation.model_dump(),
        export=list(body.export),
        seed=body.seed,
        materials=recipes.materials(model, dataset),
        recipe_versions=recipe_versions,
    )
    for index, config in enumerate(configs):
        jobs.add_step(job.id, index, config.op, config.to_dict())
    events.record(session, job.id, "status", status="queued")
    if idem is not None:
        idempotency.remember(session, team_id, idem, 202, job.id, f"/v1/jobs/{job.id}")
    try:
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise idempotency.in_use() from exc
    _publish(session, settings, job)
    return job


def check_active_jobs(session: Session, settings: Settings, team_id: str) -> None:
    """A team may have at most `team_max_active_jobs` queued or running jobs (429)."""
    active = JobRepository(session).count_active(team_id)
    if active >= settings.team_max_active_jobs:
        raise LimitReached(
            "too_many_active_jobs",
            f"Your team has {active} queued or running jobs, the most allowed "
            f"({settings.team_max_active_jobs}). Wait for some to finish (or cancel them with "
            "POST /v1/jobs/{id}/cancel), then retry.",
            retry_after=30,
        )


def _check_plan(
    model_format: str, configs: list[OpConfig], dataset: Dataset | None, body: JobCreate
) -> None:
    """Each op can run where the pipeline puts it, has the data it needs, and the export exists."""
    try:
        validate_request(
            configs,
            model_format,
            export=body.export,
            task=body.evaluation.task,
            has_dataset=dataset is not None,
            has_labels=dataset is not None and dataset.has_labels,
        )
    except PipelineError as exc:
        raise _problem(exc) from exc


def _check_floor(body: JobCreate) -> None:
    """evaluation.floor names known metrics with possible values (engine.quality)."""
    try:
        check_floor(body.evaluation.floor)
    except FloorError as exc:
        raise Invalid(
            "invalid_floor",
            str(exc),
            field=f"evaluation.floor.{exc.key}",
            valid_keys=sorted(FLOOR_KEYS),
        ) from exc


def _check_students(session: Session, team_id: str, configs: list[OpConfig]) -> None:
    """A distillation student given by id is one of the team's ready .pt2 models."""
    for index, config in enumerate(configs):
        student_id = getattr(config, "student_model_id", None)
        if student_id is None:
            continue
        where = f"pipeline[{index}].student_model_id"
        student = TeamRepository(session, Model, team_id).get(student_id)
        if student is None:
            raise Invalid(
                "student_not_found", f"No model {student_id!r} in your team.", field=where
            )
        if student.format != "pt2" or student.status != ModelStatus.ready:
            raise Invalid(
                "student_invalid",
                f"The student model must be a ready torch.export .pt2 (it is {student.format}, "
                f"{student.status}): distillation trains it.",
                field=where,
            )


def _publish(session: Session, settings: Settings, job: Job) -> None:
    """After commit: a failed publish leaves the job queued for the reconciler to publish.
    The row is locked first, so a reconciler pass never publishes it at the same time."""
    if not JobRepository(session).lock_if_unpublished(job.id):
        session.commit()  # the reconciler published it already (this request was slow)
        return
    publishing.publish_job(session, settings, job.id, recovered=False)
    session.commit()


def cancel(session: Session, team_id: str, job_id: str) -> None:
    """Stop a queued or running job; the worker notices within a heartbeat and stops its child.

    The checkpoints of the steps that finished are kept, so a retry resumes after them."""
    job = get_or_raise(session, team_id, job_id)
    if job.status == JobStatus.canceled:
        return
    jobs = _repo(session, team_id)
    error = {"code": "canceled", "detail": "The job was canceled by request.", "step": None}
    if not jobs.cancel(job.id, error):
        session.rollback()
        raise Conflict(
            "job_not_cancelable",
            f"The job already {job.status}; only queued or running jobs can be canceled.",
        )
    jobs.reset_unfinished_steps(job.id)
    events.record(session, job.id, "status", status="canceled")
    events.record(session, job.id, events.TERMINAL_EVENT, status="canceled")
    session.commit()


def retry(session: Session, settings: Settings, team_id: str, job_id: str) -> Job:
    """Queue a failed or canceled job again; it resumes after the last valid stored checkpoint
    (the worker checks the checkpoint's file again when it claims the job)."""
    job = get_or_raise(session, team_id, job_id)
    if job.status not in (JobStatus.failed, JobStatus.canceled):
        raise Conflict(
            "job_not_retryable",
            f"The job is {job.status}; only failed or canceled jobs can be retried.",
        )
    check_active_jobs(session, settings, team_id)
    resume = checkpoints.resume_point(session, job)
    start = resume.start_index if resume else 0
    jobs = _repo(session, team_id)
    jobs.reset_steps_from(job.id, start)
    if not jobs.requeue(job.id, progress=start / max(len(job.steps), 1)):
        session.rollback()
        raise Conflict("job_not_retryable", "The job changed state; read it and try again.")
    events.record(session, job.id, "status", status="queued", reason="retry", resume_from=start)
    session.commit()
    session.refresh(job)
    _publish(session, settings, job)
    return job


def get_or_raise(session: Session, team_id: str, job_id: str) -> Job:
    job = _repo(session, team_id).get_with_steps(job_id)
    if job is None:
        raise not_found("job", job_id)
    return job


def get_page(
    session: Session, team_id: str, limit: int, cursor: str | None, status: str | None
) -> Page[Job]:
    return page_or_422(lambda: _repo(session, team_id).get_page(limit, cursor, status=status))


def to_read(job: Job, artifacts: list[Artifact]) -> JobRead:
    return JobRead(
        id=job.id,
        model_id=job.model_id,
        dataset_id=job.dataset_id,
        status=job.status,  # type: ignore[arg-type]
        progress=job.progress,
        current_step=job.current_step,
        preset=job.preset,
        evaluation=job.evaluation,
        export=job.export,
        seed=job.seed,
        steps=[JobStepRead.model_validate(step) for step in job.steps],
        metrics=job.metrics,
        quality=job.quality,
        artifacts=[ArtifactRead.model_validate(a) for a in artifacts],
        warnings=[
            *(job.warnings or []),
            *step_warnings((s.index, s.op, s.warnings) for s in job.steps),
            *recipes.version_warnings(job),
        ],
        error=job.error,  # type: ignore[arg-type]
        attempts=job.attempts,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def read(session: Session, team_id: str, job_id: str) -> JobRead:
    job = get_or_raise(session, team_id, job_id)
    return to_read(job, _repo(session, team_id).artifacts_of([job.id])[job.id])


def read_page(
    session: Session, team_id: str, limit: int, cursor: str | None, status: str | None
) -> tuple[list[JobRead], str | None]:
    page = get_page(session, team_id, limit, cursor, status)
    ids = [job.id for job in page.items]
    jobs = _repo(session, team_id)
    arts = jobs.artifacts_of(ids)
    steps = jobs.steps_of(ids)
    for job in page.items:
        set_committed_value(job, "steps", steps[job.id])
    return [to_read(job, arts[job.id]) for job in page.items], page.next_cursor


def get_artifact_or_raise(session: Session, team_id: str, artifact_id: str) -> Artifact:
    artifact = TeamRepository(session, Artifact, team_id).get(artifact_id)
    if artifact is None:
        raise not_found("artifact", artifact_id)
    return artifact
