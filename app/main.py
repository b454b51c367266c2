"""create_app(): routers, problem handlers, settings on app.state, the embedded reconciler."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from app import logs
from app.api import openapi, ops, problems
from app.api.headers import SecurityHeaders
from app.api.ratelimit import AuthFailureLimit, JsonBodyLimit, Limiter, team_limits
from app.api.routes import artifacts, catalog, datasets, health, jobs, keys, models
from app.api.telemetry import RequestTelemetry
from app.config import Settings, get_settings
from app.db.session import configure_pool
from app.services.telemetry import ClusterCollector
from app.signing import signing_key
from app.storage import get_blob_store
from app.ui import install as install_dashboard


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    logs.configure("api", settings.log_format)  # ops-metrics: structlog for every log line
    access = logging.getLogger("compaas.access")
    access.setLevel(logging.NOTSET if settings.access_log else logging.WARNING)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        reconciler = None
        if settings.run_reconciler:
            from app.services.reconciler import ReconcilerThread

            reconciler = ReconcilerThread(settings)
            reconciler.start()
        try:
            yield
        finally:
            if reconciler is not None:
                reconciler.stop()

    app = FastAPI(
        title="compaas",
        version="0.1.0",
        description="Compression-as-a-service for edge AI: upload a model, run a compression "
        "job, download an edge-ready artifact with measured size, speed and accuracy.",
        lifespan=lifespan,
        # served by app.api.ops instead, so COMPAAS_OPS_TOKEN can guard them
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    # `compaas api` tells each of its processes how many there are (COMPAAS_API_WORKERS).
    processes = settings.api_workers or 1
    configure_pool(*settings.db_pool(processes))
    if settings.mode == "embedded":
        signing_key(settings)  # generated on first start, so GET /v1/keys is stable from now on
    app.state.storage = get_blob_store(settings)
    app.state.limiter = Limiter(settings)
    app.state.cluster_metrics = ClusterCollector(settings)  # ops-metrics: /metrics
    if processes > 1 and not app.state.limiter.shared:
        logging.getLogger(__name__).warning(
            "%d API processes count rate limits each on their own (no Redis): a team may send "
            "up to %d times COMPAAS_TEAM_REQUESTS_PER_WINDOW; set COMPAAS_RATE_LIMIT_STORAGE_URL",
            processes,
            processes,
        )
    problems.install(app)
    openapi.install(app, settings)
    for module in (health, catalog, keys, ops):
        app.include_router(module.router)
    for module in (models, datasets, jobs, artifacts):
        app.include_router(module.router, dependencies=[Depends(team_limits)])
    install_dashboard(app)  # the web dashboard at /ui and `GET /` (issue #16, app/ui)
    app.add_middleware(JsonBodyLimit, max_bytes=settings.max_json_body_bytes)
    app.add_middleware(AuthFailureLimit, limiter=app.state.limiter)
    # Outside Starlette's error middleware too, so that even a 500 carries the headers.
    docs = {ops.DOCS_URL: "swagger", ops.REDOC_URL: "redoc"}
    build_stack = app.build_middleware_stack
    # ops-metrics: request id, access log and latency histogram around everything but the headers
    app.build_middleware_stack = lambda: SecurityHeaders(  # type: ignore[method-assign]
        RequestTelemetry(build_stack()), docs
    )
    return app
