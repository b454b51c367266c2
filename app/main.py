"""create_app(): routers, problem handlers, settings on app.state, the embedded reconciler."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api import ops, problems
from app.api.routes import artifacts, catalog, datasets, health, jobs, models
from app.config import Settings, get_settings
from app.storage import get_blob_store


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

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
    app.state.storage = get_blob_store(settings)
    problems.install(app)
    for module in (health, models, datasets, jobs, artifacts, catalog, ops):
        app.include_router(module.router)
    return app
