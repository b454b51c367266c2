from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse

from app.api.deps import SettingsDep
from app.api.ops import OPS_TOKEN_RESPONSES, OpsTokenDep
from app.config import Settings
from app.db.models import JobStatus, ModelStatus
from app.db.repositories.janitor import JanitorRepository
from app.db.repositories.operations import OperationsRepository
from app.db.session import get_sessionmaker
from app.queue import get_publisher
from app.services import janitor, worker_hosts

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    dependencies=[OpsTokenDep],
    responses=OPS_TOKEN_RESPONSES,
)
def metrics(settings: SettingsDep) -> str:
    """Prometheus text format: jobs and models by status, and what the janitor reclaimed (for
    operators, across teams)."""
    lines = ["# TYPE compaas_jobs gauge"]
    with get_sessionmaker(settings.database_url)() as session:
        counts = OperationsRepository(session)
        jobs, models = counts.jobs_by_status(), counts.models_by_status()
        cleaned = JanitorRepository(session)
        reclaimed, (watching, watching_bytes) = cleaned.reclaimed(), cleaned.candidate_count()
    lines += [f'compaas_jobs{{status="{s}"}} {jobs.get(s, 0)}' for s in JobStatus]
    lines.append("# TYPE compaas_models gauge")
    lines += [f'compaas_models{{status="{s}"}} {models.get(s, 0)}' for s in ModelStatus]
    for index, unit in enumerate(("files", "bytes")):
        name = f"compaas_janitor_reclaimed_{unit}_total"
        lines.append(f"# TYPE {name} counter")
        lines += [f'{name}{{kind="{k}"}} {reclaimed.get(k, (0, 0))[index]}' for k in janitor.KINDS]
    lines.append("# TYPE compaas_janitor_orphan_candidates gauge")
    lines.append(f"compaas_janitor_orphan_candidates {watching}")
    lines.append("# TYPE compaas_janitor_orphan_candidate_bytes gauge")
    lines.append(f"compaas_janitor_orphan_candidate_bytes {watching_bytes}")
    return "\n".join(lines) + "\n"


@router.get("/readyz")
def readyz(settings: SettingsDep) -> JSONResponse:
    """Database and broker reachable; 503 naming whichever is not."""
    checks: dict[str, Any] = {}
    try:
        with get_sessionmaker(settings.database_url)() as session:
            OperationsRepository(session).ping()
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unavailable: {type(exc).__name__}"
    try:
        with get_publisher(settings).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unavailable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {
            "status": "ready" if ready else "unavailable",
            "checks": checks,
            "sandbox": _sandbox(settings),
        },
        status_code=200 if ready else 503,
    )


def _sandbox(settings: Settings) -> dict[str, Any]:
    """What the sandbox requires and what each recently started worker host found (informative)."""
    try:
        hosts: list[dict[str, Any]] | str = worker_hosts.recent(settings)
    except Exception as exc:
        hosts = f"unavailable: {type(exc).__name__}"
    return {"require": list(settings.sandbox_requirements), "worker_hosts": hosts}
