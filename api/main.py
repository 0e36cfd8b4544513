"""The FastAPI application."""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute

from api import observability
from api.errors import ERROR_RESPONSES, InternalErrorMiddleware, install_error_handlers
from api.guard import GuardMiddleware
from api.location import LocationMiddleware
from api.predictor import Predictor
from api.routes import batches, datasets, events, health, jobs, keys, models, plots, predict, projects, ui, v2, webhooks
from api.uploads import sweep_stale
from shared.config import get_settings

# An upload spooled this long ago with no process finishing it belongs to a process that died.
STALE_UPLOAD_S = 3600.0


def operation_id(route: APIRoute) -> str:
    """The route function's name (create_job, list_models...): what generated clients call their methods."""
    return route.name


def create_app() -> FastAPI:
    settings = get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        sweep_stale(settings.data_dir / "tmp", older_than_s=STALE_UPLOAD_S)
        app.state.predictor = Predictor(settings)
        yield
        app.state.predictor.close()

    # /docs and /redoc are served by api.routes.ui from local assets (offline).
    app = FastAPI(title="tuneserve", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  generate_unique_id_function=operation_id,
                  description="Fine-tune ImageNet ResNets on your own labelled images and serve predictions.")
    install_error_handlers(app)
    for router in (health.router, projects.router, keys.router, datasets.router, jobs.router, models.router,
                   predict.router, batches.router, events.router, plots.router, webhooks.router, observability.router):
        app.include_router(router, responses=ERROR_RESPONSES)
    app.include_router(v2.router, responses=ERROR_RESPONSES)
    ui.install_ui(app)
    app.add_middleware(LocationMiddleware)
    app.add_middleware(GuardMiddleware)
    app.add_middleware(InternalErrorMiddleware)  # inside the request id, outside everything else
    app.add_middleware(observability.ObservabilityMiddleware)
    return app


observability.configure_logging(logging.INFO)
app = create_app()
