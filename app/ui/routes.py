"""The dashboard's pages and forms. Pages read through the same services as /v1, always scoped
to the signed-in team; every form that changes something carries the session's CSRF token."""

from __future__ import annotations

import json
import secrets
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from app.api.deps import open_session
from app.api.multipart import receive_upload
from app.api.problems import Problem
from app.api.ratelimit import team_limits
from app.config import Settings
from app.db.base import utcnow
from app.errors import AppError, NotFound
from app.report import view as report_view
from app.report.render import stylesheet
from app.schemas.datasets import DatasetRead
from app.schemas.jobs import JobCreate
from app.schemas.models import ModelRead
from app.security import api_key_pepper
from app.services import jobs as job_service
from app.services import ui_sessions, uploaded
from app.services.auth import AuthError, ExpiredApiKey
from app.services.datasets import DATASETS
from app.services.models import MODELS
from app.services.uploaded import UploadedKind
from app.ui import compare as compare_view
from app.ui.web import (
    LOGIN_CSRF_COOKIE,
    CsrfRejected,
    SignInRequired,
    Viewer,
    check_csrf,
    clear_session_cookie,
    is_secure,
    render,
    safe_next,
    see_other,
    session_token,
    set_session_cookie,
    viewer,
    viewer_or_none,
)
from engine.config import PRESETS

router = APIRouter(include_in_schema=False)

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
TERMINAL = ("succeeded", "failed", "canceled")
StatusFilter = Literal["", "queued", "running", "succeeded", "failed", "canceled"]


# The /v1 per-team limits (rate, requests and uploads in flight) on the dashboard's forms too;
# over them the answer is the API's 429 problem with Retry-After.
counted = asynccontextmanager(team_limits)


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


# ----------------------------------------------------------------------------- sign in / out


@router.get("/")
def root() -> RedirectResponse:
    """`GET /` opens the dashboard."""
    return RedirectResponse("/ui", status_code=307)


@router.get("/ui/login")
def login_page(request: Request, next: str | None = None) -> Response:  # noqa: A002
    if viewer_or_none(request) is not None:
        return see_other(safe_next(next))
    return _login_form(request, next, None, 200)


def _login_form(request: Request, next_url: str | None, error: str | None, status: int) -> Response:
    """The form, with a fresh login CSRF token in a cookie and in the form (double submit: a
    page on another site can neither read the cookie nor set it, so it cannot sign a browser
    into someone else's team)."""
    login_csrf = secrets.token_urlsafe(24)
    response = render(
        "login.html.j2", None, status, next_url=safe_next(next_url), error=error, csrf=login_csrf
    )
    response.set_cookie(
        LOGIN_CSRF_COOKIE,
        login_csrf,
        max_age=3600,
        path="/ui/login",
        secure=is_secure(request),
        httponly=True,
        samesite="strict",
    )
    return response


@router.post("/ui/login")
async def login(request: Request) -> Response:
    form = await request.form()
    next_url = str(form.get("next") or "/ui")
    sent = str(form.get("csrf") or "")
    expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not sent or not expected or not secrets.compare_digest(sent, expected):
        return _login_form(
            request,
            next_url,
            "The sign-in form expired or was not sent from this page. Sign in again here.",
            403,
        )
    limiter = request.app.state.limiter
    address = request.client.host if request.client else "unknown"
    if not await limiter.allowed(limiter.auth_rate, "auth", address):
        retry = await limiter.retry_after(limiter.auth_rate, "auth", address)
        return _login_form(
            request,
            next_url,
            f"Too many sign-ins with an invalid API key from your address. Retry after {retry} s.",
            429,
        )
    key = str(form.get("api_key") or "").strip()
    settings = _settings(request)

    def exchange() -> tuple[str, ui_sessions.SignedIn]:
        with open_session(settings) as session:
            return ui_sessions.sign_in(session, key, api_key_pepper(settings))

    try:
        token, signed_in = await run_in_threadpool(exchange)
    except ExpiredApiKey as exc:
        await limiter.hit(limiter.auth_rate, "auth", address)
        return _login_form(
            request,
            next_url,
            f"The API key {exc.prefix}… expired at {exc.expired_at.isoformat()}. Ask an "
            "operator for a new one (`compaas admin create-key TEAM`).",
            401,
        )
    except AuthError:
        await limiter.hit(limiter.auth_rate, "auth", address)
        return _login_form(
            request,
            next_url,
            "That API key is not valid or was revoked. Paste the whole key (it starts with "
            "`cmp_`); an operator creates one with `compaas admin create-key TEAM`.",
            401,
        )
    response = see_other(safe_next(next_url))
    lifetime = int((signed_in.expires_at - utcnow()).total_seconds())
    set_session_cookie(response, request, token, max(lifetime, 1))
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/ui/login")
    return response


@router.post("/ui/logout")
async def logout(request: Request) -> Response:
    who = await run_in_threadpool(viewer, request)
    form = await request.form()
    check_csrf(request, who, str(form.get("csrf") or ""))
    settings = _settings(request)

    def end() -> None:
        with open_session(settings) as session:
            ui_sessions.sign_out(session, session_token(request), api_key_pepper(settings))

    await run_in_threadpool(end)
    response = see_other("/ui/login")
    clear_session_cookie(response, request)
    return response


# ----------------------------------------------------------------------------- jobs


@router.get("/ui")
def jobs_page(
    request: Request,
    status: StatusFilter = "",
    cursor: str | None = None,
) -> Response:
    who = viewer(request)
    with open_session(_settings(request)) as session:
        try:
            items, next_cursor = job_service.read_page(
                session, who.team.id, 50, cursor, status or None
            )
        except AppError as exc:
            return render("error.html.j2", who, 422, title="Jobs", error=exc)
    jobs = [j.model_dump(mode="json") for j in items]
    return render(
        "jobs.html.j2",
        who,
        jobs=jobs,
        status=status,
        statuses=JOB_STATUSES,
        next_cursor=next_cursor,
    )


@router.get("/ui/jobs/new")
def new_job_page(request: Request, model_id: str | None = None) -> Response:
    who = viewer(request)
    return _new_job_form(request, who, {"model_id": model_id or ""}, None, 200)


def _new_job_form(
    request: Request, who: Viewer, values: dict[str, str], error: Any, status: int
) -> Response:
    with open_session(_settings(request)) as session:
        models = uploaded.get_page(session, MODELS, who.team.id, 100, None).items
        datasets = uploaded.get_page(session, DATASETS, who.team.id, 100, None).items
        model_rows = [ModelRead.model_validate(m).model_dump(mode="json") for m in models]
        dataset_rows = [DatasetRead.model_validate(d).model_dump(mode="json") for d in datasets]
    presets = [(name, preset["description"]) for name, preset in sorted(PRESETS.items())]
    return render(
        "new_job.html.j2",
        who,
        status,
        models=model_rows,
        datasets=dataset_rows,
        presets=presets,
        values=values,
        error=error,
    )


@router.post("/ui/jobs")
async def create_job(request: Request) -> Response:
    who = await run_in_threadpool(viewer, request)
    form = await request.form()
    check_csrf(request, who, str(form.get("csrf") or ""))
    values = {k: str(v) for k, v in form.items() if k != "csrf" and isinstance(v, str)}
    async with counted(request, who.team):
        return await run_in_threadpool(_create_job, request, who, values)


def _job_body(values: dict[str, str]) -> dict[str, Any]:
    """The POST /v1/jobs body the form describes (AppError naming the field when it can't)."""
    body: dict[str, Any] = {
        "model_id": values.get("model_id") or None,
        "dataset_id": values.get("dataset_id") or None,
        "evaluation": {"task": values.get("task") or "classification"},
    }
    if values.get("kind", "preset") == "preset":
        body["preset"] = values.get("preset") or None
    else:
        try:
            pipeline = json.loads(values.get("pipeline") or "")
        except json.JSONDecodeError as exc:
            raise AppError(
                "invalid_pipeline",
                f"The pipeline is not JSON ({exc.msg} at line {exc.lineno}, column "
                f"{exc.colno}). Write a list of steps, e.g. "
                '[{"op": "quantize", "mode": "static", "dtype": "int8"}].',
                field="pipeline",
            ) from None
        body["pipeline"] = pipeline
    return body


def _create_job(request: Request, who: Viewer, values: dict[str, str]) -> Response:
    settings = _settings(request)
    try:
        body = JobCreate.model_validate(_job_body(values))
        with open_session(settings) as session:
            job = job_service.create(session, settings, who.team.id, body, None)
            job_id = job.id
    except AppError as exc:
        return _new_job_form(request, who, values, exc, 422)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        error = AppError("invalid_job", f"{where}: {first['msg']}", field=where)
        return _new_job_form(request, who, values, error, 422)
    return see_other(f"/ui/jobs/{job_id}")


@router.get("/ui/jobs/{job_id}")
def job_page(request: Request, job_id: str) -> Response:
    who = viewer(request)
    with open_session(_settings(request)) as session:
        try:
            job = job_service.read(session, who.team.id, job_id).model_dump(mode="json")
        except NotFound as exc:
            return render("error.html.j2", who, 404, title="Job not found", error=exc)
    return render(
        "job.html.j2",
        who,
        job=job,
        report=report_view.build(job),
        terminal=job["status"] in TERMINAL,
        progress=round(100 * float(job["progress"] or 0)),
    )


@router.post("/ui/jobs/{job_id}/{action}")
async def job_action(request: Request, job_id: str, action: Literal["cancel", "retry"]) -> Response:
    who = await run_in_threadpool(viewer, request)
    form = await request.form()
    check_csrf(request, who, str(form.get("csrf") or ""))
    settings = _settings(request)

    def act() -> Response:
        with open_session(settings) as session:
            try:
                if action == "cancel":
                    job_service.cancel(session, who.team.id, job_id)
                else:
                    job_service.retry(session, settings, who.team.id, job_id)
            except NotFound as exc:
                return render("error.html.j2", who, 404, title="Job not found", error=exc)
            except AppError as exc:
                return render("error.html.j2", who, 409, title=f"Cannot {action}", error=exc)
        return see_other(f"/ui/jobs/{job_id}")

    async with counted(request, who.team):
        return await run_in_threadpool(act)


@router.get("/ui/compare")
def compare_page(
    request: Request,
    job: Annotated[list[str] | None, Query()] = None,
    x: compare_view.XAxis = "size",
) -> Response:
    """The chosen jobs (?job=…&job=…), or the team's latest 30 succeeded ones."""
    who = viewer(request)
    with open_session(_settings(request)) as session:
        if job:
            jobs = []
            for job_id in job[:30]:
                try:
                    jobs.append(job_service.read(session, who.team.id, job_id))
                except NotFound as exc:
                    return render("error.html.j2", who, 404, title="Job not found", error=exc)
        else:
            jobs, _ = job_service.read_page(session, who.team.id, 30, None, "succeeded")
    data = [j.model_dump(mode="json") for j in jobs]
    return render(
        "compare.html.j2",
        who,
        comparison=compare_view.compare(data, x),
        chosen=job or [],
        x_axes=list(compare_view.X_AXES),
    )


# ----------------------------------------------------------------------------- uploads


@router.get("/ui/uploads")
def uploads_page(request: Request, uploaded_id: str | None = None) -> Response:
    who = viewer(request)
    return _uploads(request, who, None, 200, uploaded_id)


def _uploads(
    request: Request, who: Viewer, error: AppError | None, status: int, uploaded_id: str | None
) -> Response:
    with open_session(_settings(request)) as session:
        models = uploaded.get_page(session, MODELS, who.team.id, 100, None).items
        datasets = uploaded.get_page(session, DATASETS, who.team.id, 100, None).items
        model_rows = [ModelRead.model_validate(m).model_dump(mode="json") for m in models]
        dataset_rows = [DatasetRead.model_validate(d).model_dump(mode="json") for d in datasets]
    return render(
        "uploads.html.j2",
        who,
        status,
        models=model_rows,
        datasets=dataset_rows,
        error=error,
        uploaded_id=uploaded_id,
        pending=any(m["status"] == "pending" for m in model_rows),
    )


async def _upload(request: Request, kind: UploadedKind[Any]) -> Response:
    who = await run_in_threadpool(viewer, request)
    async with counted(request, who.team):
        return await _receive(request, who, kind)


async def _receive(request: Request, who: Viewer, kind: UploadedKind[Any]) -> Response:
    settings = _settings(request)
    try:
        upload = await receive_upload(
            request,
            settings.tmp_dir,
            settings.max_upload_bytes,
            idle_timeout_s=settings.upload_idle_timeout_s,
            deadline_s=settings.upload_deadline_s,
        )
    except Problem as exc:
        error = AppError(exc.code, exc.detail, field="file")
        return await run_in_threadpool(_uploads, request, who, error, exc.status, None)
    storage = request.app.state.storage

    def store() -> Response:
        try:
            check_csrf(request, who, upload.fields.get("csrf"))
            name = upload.fields.get("name") or None
            with open_session(settings) as session:
                try:
                    row = uploaded.create(
                        session, storage, settings, kind, who.team.id, upload, name, None
                    )
                except AppError as exc:
                    return _uploads(request, who, exc, 422, None)
                return see_other(f"/ui/uploads?uploaded_id={row.id}")
        finally:
            upload.discard()

    return await run_in_threadpool(store)


@router.post("/ui/models")
async def upload_model(request: Request) -> Response:
    return await _upload(request, MODELS)


@router.post("/ui/datasets")
async def upload_dataset(request: Request) -> Response:
    return await _upload(request, DATASETS)


# ----------------------------------------------------------------------------- wiring


@router.get("/ui/static/report.css")
def report_css() -> Response:
    """The report's stylesheet (its charts' colours), served as a file for the job page."""
    return Response(
        stylesheet(), media_type="text/css", headers={"Cache-Control": "public, max-age=300"}
    )


def install(app: FastAPI) -> None:
    """Routes, static files (the script and stylesheet in app/ui/static), and the answers to
    a missing session (a redirect to sign in) and a missing CSRF token (403)."""
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(packages=[("app.ui", "static")]), name="ui-static")

    async def sign_in_first(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SignInRequired)
        from urllib.parse import quote

        return RedirectResponse(f"/ui/login?next={quote(exc.next_url, safe='/')}", 303)

    async def csrf_rejected(request: Request, exc: Exception) -> Response:
        who = await run_in_threadpool(viewer_or_none, request)
        error = AppError(
            "csrf_rejected",
            "This form was not sent from a dashboard page of your current session (its CSRF "
            "token is missing or from another session). Reload the page and send it again.",
        )
        response: HTMLResponse = render("error.html.j2", who, 403, title="Refused", error=error)
        return response

    app.add_exception_handler(SignInRequired, sign_in_first)
    app.add_exception_handler(CsrfRejected, csrf_rejected)
