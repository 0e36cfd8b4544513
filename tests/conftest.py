"""Fixtures that stand up real parts: a private Postgres database, a Redis key prefix, and the
service itself (API + Celery worker as subprocesses) on embedded or server backends."""

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from shared.celery_app import get_celery
from shared.config import get_settings
from shared.db import get_engine, get_sessionmaker

REPO_ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("TUNESERVE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TUNESERVE_TEST_REDIS", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Every row an earlier test left, except project `default`, which always exists.
CLEAN_SQL = ("TRUNCATE webhook_deliveries, webhook_events, webhooks, batch_predictions, job_epochs, models, jobs, "
             "datasets, api_keys CASCADE; "
             "DELETE FROM projects WHERE name <> 'default'")


def unavailable(what: str, exc: Exception) -> None:
    message = f"{what} is not reachable ({exc}); start it or set the TUNESERVE_TEST_* URL"
    if IN_CI:
        pytest.fail(f"CI=true and {message}")
    pytest.skip(f"SKIPPING LOUDLY: {message}")


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


def reset_caches() -> None:
    for cached in (get_settings, get_engine, get_sessionmaker, get_celery):
        cached.cache_clear()


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
def env_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., dict[str, str]]:
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
def migrated(env_for, pg_url, redis_url) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Settings on real Postgres + Redis, schema at head, all rows from earlier tests removed."""
    from shared.migrate import upgrade

    env = env_for(pg_url, redis_url)
    upgrade()
    with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(CLEAN_SQL)
    return env


@pytest.fixture
def make_app(migrated, env_for, pg_url, redis_url):  # type: ignore[no-untyped-def]
    """``make_app(**settings)``: an in-process TestClient on a clean, migrated Postgres with extra settings."""
    from fastapi.testclient import TestClient

    from api.main import create_app

    def make(**settings: str) -> TestClient:
        env_for(pg_url, redis_url, **settings)
        return TestClient(create_app())

    return make


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Service:
    url: str
    env: dict[str, str]
    processes: list[subprocess.Popen]
    log_dir: Path

    def client(self, **kwargs) -> httpx.Client:  # type: ignore[no-untyped-def]
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)

    def start_worker(self, name: str = "worker") -> subprocess.Popen:
        log = (self.log_dir / f"{name}-{len(self.processes)}.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "shared.cli", "worker", "--queues", "ingest,train,batch"],
                                env=self.env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in self.log_dir.glob("*.log"))


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.25, what: str = "condition"
             ) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def launch(env: dict[str, str], log_dir: Path, workers: int = 1) -> Service:
    """Migrate, then start the API (uvicorn) and ``workers`` Celery workers as real subprocesses."""
    log_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "shared.cli", "migrate"], env=env, cwd=REPO_ROOT, check=True,
                   capture_output=True)
    port = free_port()
    api_log = (log_dir / "api.log").open("wb")
    api = subprocess.Popen([sys.executable, "-m", "shared.cli", "api", "--port", str(port)], env=env,
                           cwd=REPO_ROOT, stdout=api_log, stderr=subprocess.STDOUT)
    service = Service(url=f"http://127.0.0.1:{port}", env=env, processes=[api], log_dir=log_dir)
    for _ in range(workers):
        service.start_worker()

    def healthy() -> bool:
        try:
            return httpx.get(f"{service.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, 60, what="the API to answer /healthz")
    except AssertionError:
        shutdown(service)
        raise
    return service


def shutdown(service: Service) -> None:
    for proc in service.processes:
        if proc.poll() is None:
            proc.terminate()
    for proc in service.processes:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


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
