"""The FastAPI application."""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.errors import install_error_handlers
from api.predictor import Predictor
from api.routes import datasets, health, jobs, models, predict
from shared.config import get_settings


def create_app() -> FastAPI:
    settings = get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        app.state.predictor = Predictor(settings)
        yield

    app = FastAPI(title="tuneserve", version="0.1.0", lifespan=lifespan,
                  description="Fine-tune ImageNet ResNets on your own labelled images and serve predictions.")
    install_error_handlers(app)
    for router in (health.router, datasets.router, jobs.router, models.router, predict.router):
        app.include_router(router)
    return app


logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
app = create_app()
