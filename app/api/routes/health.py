from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.api.deps import SettingsDep
from app.api.ops import OPS_TOKEN_RESPONSES, OpsTokenDep
from app.config import Settings
from app.db.repositories.operations import OperationsRepository
from app.db.session import get_sessionmaker
from app.queue import get_publisher
from app.services import telemetry, worker_hosts

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[OpsTokenDep],
    responses=OPS_TOKEN_RESPONSES,
)
def metrics(request: Request) -> Response:
    """Prometheus text format (prometheus-client): request latency by route, job and step
    durations, queue depth, worker heartbeats, sandbox kills, jobs and models by status and the
    janitor's totals, for operators, across teams ([operations](docs/operations.md#metrics))."""
    body, content_type = telemetry.exposition(
        request.app.state.cluster_metrics, request.headers.get("accept")
    )
    return Response(body, headers={"Content-Type": content_type})


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
