from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response

from app.api.deps import CurrentTeam, PageDep, SessionDep, SettingsDep
from app.schemas.common import Page
from app.schemas.jobs import JobCreate, JobRead
from app.services import jobs as job_service

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JobStatusFilter = Literal["queued", "running", "succeeded", "failed", "canceled"]


@router.post("", status_code=202, response_model=JobRead)
def create_job(
    body: JobCreate,
    response: Response,
    team: CurrentTeam,
    session: SessionDep,
    settings: SettingsDep,
) -> JobRead:
    """Queue a compression job; poll GET /v1/jobs/{id} (the Location header) for its progress."""
    job = job_service.create(session, settings, team.id, body)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_service.read(session, team.id, job.id)


@router.get("", response_model=Page[JobRead])
def list_jobs(
    team: CurrentTeam,
    session: SessionDep,
    page: PageDep,
    status: Annotated[JobStatusFilter | None, Query()] = None,
) -> Page[JobRead]:
    items, next_cursor = job_service.read_page(session, team.id, page.limit, page.cursor, status)
    return Page(items=items, next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobRead)
def get_job(job_id: str, team: CurrentTeam, session: SessionDep) -> JobRead:
    return job_service.read(session, team.id, job_id)
