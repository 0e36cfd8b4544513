"""Fixtures that stand up real parts: a private Postgres database, a Redis key prefix, and the
service itself (API + Celery worker as subprocesses) on embedded or server backends."""

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from tests.processes import CLEAN_SQL, PG_ADMIN, REDIS_URL, Service, launch, reset_caches, shutdown, unavailable


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--reverse", action="store_true",
                     help="run the collected tests in reverse order, to find tests that depend on the ones before them")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--reverse"):
        items.reverse()


@pytest.fixture(autouse=True)
def pillow_pixel_limit() -> Iterator[None]:
    """Pillow's MAX_IMAGE_PIXELS is process-wide; our code passes its pixel limits per call (api.images,
    worker.images). A test that leaves it changed would make later tests depend on the order they run in:
    it is put back, and the test that changed it errors."""
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    yield
    after, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, before
    assert after == before, f"PIL.Image.MAX_IMAGE_PIXELS was left at {after} (was {before}); pass limits per call"


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    name = f"tuneserve_test_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        unavailable("PostgreSQL", exc)
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        unavailable("Redis", exc)
    return REDIS_URL


@pytest.fixture
def env_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., dict[str, str]]]:
    """Point this process's Settings at a backend: ``env_for()`` is embedded, ``env_for(db, broker)``
    uses servers. Returns the environment to hand to subprocesses."""

    def configure(database_url: str | None = None, broker_url: str | None = None, **extra: str) -> dict[str, str]:
        values = {"TUNESERVE_DATA_DIR": str(tmp_path / "data"),
                  "TUNESERVE_BROKER_KEY_PREFIX": f"test-{uuid.uuid4().hex[:8]}:",
                  "TUNESERVE_DEVICE": "cpu",
                  # Most tests queue jobs with the default (ImageNet) weights, which this offline machine
                  # lacks; the up-front check has its own tests (tests/test_weights.py).
                  "TUNESERVE_CHECK_WEIGHTS": "false", **extra}
        if database_url:
            values["TUNESERVE_DATABASE_URL"] = database_url
        if broker_url:
            values["TUNESERVE_BROKER_URL"] = broker_url
        for key in ("TUNESERVE_DATABASE_URL", "TUNESERVE_BROKER_URL"):
            monkeypatch.delenv(key, raising=False)
        for key, value in values.items():
            monkeypatch.setenv(key, value)
        reset_caches()
        return {**os.environ, **values}

    yield configure
    reset_caches()


@pytest.fixture
def migrated(env_for, pg_url, redis_url) -> dict[str, str]:
    """Settings on real Postgres + Redis, schema at head, all rows from earlier tests removed."""
    from shared.migrate import upgrade

    env = env_for(pg_url, redis_url)
    upgrade()
    with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(CLEAN_SQL)
    return env


@pytest.fixture
def make_app(migrated, env_for, pg_url, redis_url):
    """``make_app(**settings)``: an in-process TestClient on a clean, migrated Postgres with extra settings."""
    from fastapi.testclient import TestClient

    from api.main import create_app

    def make(**settings: str) -> TestClient:
        env_for(pg_url, redis_url, **settings)
        return TestClient(create_app())

    return make


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """``start_service(env, workers=1)``: a live service for this test, stopped at its end."""
    services: list[Service] = []

    def start(env: dict[str, str], workers: int = 1) -> Service:
        service = launch(env, tmp_path / f"logs-{len(services)}", workers)
        services.append(service)
        return service

    yield start
    for service in services:
        shutdown(service)
