from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.api.conditional import IfNoneMatchHeader, etag, matches, not_modified, set_validators
from app.api.deps import CurrentTeam, PageDep, SessionDep, SettingsDep
from app.api.idempotency import IdempotencyKeyHeader, replay, request_for
from app.db.session import get_sessionmaker
from app.redact import relative_paths
from app.report.render import content_security_policy, render_report
from app.schemas.common import Page
from app.schemas.jobs import JobCreate, JobRead, JobStatusRead
from app.services import events, job_views
from app.services import jobs as job_service
from app.services import recipes as recipe_service
from app.services.idempotency import save_response

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JobStatusFilter = Literal["queued", "running", "succeeded", "failed", "canceled"]
SSE_POLL_S = 0.25
SSE_KEEPALIVE_S = 15.0


@router.post("", status_code=202, response_model=JobRead)
def create_job(
    body: JobCreate,
    response: Response,
    team: CurrentTeam,
    session: SessionDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Any:
    """Queue a compression job; poll GET /v1/jobs/{id} (the Location header) for its progress."""
    idem = request_for(idempotency_key, "POST /v1/jobs", body.model_dump(mode="json"))
    replayed = replay(
        session,
        team.id,
        idem,
        lambda i: job_service.read(session, team.id, i).model_dump(mode="json"),
    )
    if replayed is not None:
        return replayed
    job = job_service.create(session, settings, team.id, body, idem)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    read = job_service.read(session, team.id, job.id)
    if idem is not None:
        save_response(session, team.id, idem, read.model_dump(mode="json"))
    return read


@router.get("", response_model=Page[JobRead])
def list_jobs(
    team: CurrentTeam,
    session: SessionDep,
    page: PageDep,
    status: Annotated[JobStatusFilter | None, Query()] = None,
) -> Page[JobRead]:
    items, next_cursor = job_service.read_page(session, team.id, page.limit, page.cursor, status)
    return Page(items=items, next_cursor=next_cursor)


@router.get(
    "/{job_id}",
    response_model=JobRead | JobStatusRead,
    responses={
        200: {
            "description": "The job (`view=full`), or its status view (`view=status`). The "
            "ETag header names this version of the view you asked for.",
            "headers": {"ETag": {"description": "send back as If-None-Match", "schema": {}}},
        },
        304: {"description": "Not Modified: your copy (If-None-Match) is current; no body."},
    },
)
def get_job(
    job_id: str,
    response: Response,
    team: CurrentTeam,
    session: SessionDep,
    view: Annotated[
        Literal["full", "status"],
        Query(
            description="`status`: only id, status, progress, current_step and updated_at, "
            "read from one row: the cheap way to poll."
        ),
    ] = "full",
    if_none_match: IfNoneMatchHeader = None,
) -> Any:
    """The job; poll it with If-None-Match (the ETag you got) and get 304 while nothing
    changed, or with ?view=status for the few fields a progress bar needs."""
    body: JobRead | JobStatusRead
    if view == "status":
        body, version = job_views.read_status(session, team.id, job_id)
    else:
        if if_none_match:
            tag = etag(job_views.stored_document_version(session, team.id, job_id))
            if matches(if_none_match, tag):
                return not_modified(tag)
        body, version = job_views.read(session, team.id, job_id)
    tag = etag(version)
    if matches(if_none_match, tag):
        return not_modified(tag)
    set_validators(response, tag)
    return body


@router.get(
    "/{job_id}/report",
    response_class=HTMLResponse,
    responses={200: {"content": {"text/html": {}}, "description": "the report page"}},
)
def job_report(job_id: str, team: CurrentTeam, session: SessionDep) -> HTMLResponse:
    """The job as one self-contained HTML page: before/after bars, the steps with their
    verdicts, per-layer sensitivity, the variants tried, training curves, warnings. Inline SVG
    and CSS only: no script and nothing fetched, so it can be saved and opened offline."""
    job = job_service.read(session, team.id, job_id)
    return HTMLResponse(
        render_report(job.model_dump(mode="json")),
        headers={
            "Content-Security-Policy": content_security_policy(),
            "Cache-Control": "no-store",
        },
    )


@router.get("/{job_id}/recipe")
def get_job_recipe(job_id: str, team: CurrentTeam, session: SessionDep) -> dict[str, Any]:
    """Everything needed to run the job again (inputs by sha256, the pipeline with every default
    filled in, evaluation, export, seed, versions) and its content hash; POST it back as
    `{"recipe": ...}` to /v1/jobs."""
    return recipe_service.read_recipe(session, team.id, job_id)


@router.post("/{job_id}/cancel", response_model=JobRead)
def cancel_job(job_id: str, team: CurrentTeam, session: SessionDep) -> JobRead:
    """Cancel a queued or running job; a running one stops within a heartbeat (about 2 s)."""
    job_service.cancel(session, team.id, job_id)
    return job_service.read(session, team.id, job_id)


@router.post("/{job_id}/retry", status_code=202, response_model=JobRead)
def retry_job(
    job_id: str, team: CurrentTeam, session: SessionDep, settings: SettingsDep
) -> JobRead:
    """Queue a failed or canceled job again, resuming after its last stored step checkpoint."""
    job_service.retry(session, settings, team.id, job_id)
    return job_service.read(session, team.id, job_id)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(
    job_id: str,
    request: Request,
    team: CurrentTeam,
    session: SessionDep,
    settings: SettingsDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    after: Annotated[int | None, Query(ge=0, description="resume after this event id")] = None,
) -> StreamingResponse:
    """Server-Sent Events: the job's whole history, then live events until `done`."""
    await run_in_threadpool(job_service.get_or_raise, session, team.id, job_id)
    start = after if after is not None else 0
    if after is None and last_event_id is not None and last_event_id.isdigit():
        start = int(last_event_id)
    maker = get_sessionmaker(settings.database_url)

    def fetch(last: int) -> list[tuple[int, str, dict[str, Any]]]:
        with maker() as s:
            return [(e.id, e.type, e.data) for e in events.after(s, team.id, job_id, last)]

    async def stream() -> AsyncIterator[str]:
        last, quiet_since = start, time.monotonic()
        yield "retry: 2000\n\n"
        while True:
            rows = await run_in_threadpool(fetch, last)
            for event_id, kind, data in rows:
                last = event_id
                payload = relative_paths(json.dumps(data))  # a failed event carries error.detail
                yield f"id: {event_id}\nevent: {kind}\ndata: {payload}\n\n"
            # A retried job has events after an earlier `done`: end only at the latest one.
            if rows and rows[-1][1] == events.TERMINAL_EVENT:
                if not await run_in_threadpool(fetch, last):
                    return
                continue
            if rows:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > SSE_KEEPALIVE_S:
                quiet_since = time.monotonic()
                yield ": keep-alive\n\n"
            if await request.is_disconnected():
                return
            await asyncio.sleep(SSE_POLL_S)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
