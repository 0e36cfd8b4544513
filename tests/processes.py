"""What tests share to reach and stand up real parts: the servers' URLs, a wait loop, and the service itself
(API + Celery workers as subprocesses). Plain functions and classes; the fixtures around them are in conftest.py."""

import glob
import importlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal, NoReturn, TypeVar

import httpx
import pytest

from shared.celery_app import get_celery
from shared.config import get_settings
from shared.db import get_engine, get_sessionmaker

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("TUNESERVE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TUNESERVE_TEST_REDIS", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Every row an earlier test left, except project `default`, which always exists.
CLEAN_SQL = ("TRUNCATE webhook_deliveries, webhook_events, webhooks, batch_predictions, job_epochs, models, jobs, "
             "datasets, api_keys CASCADE; "
             "DELETE FROM projects WHERE name <> 'default'")


def missing(message: str) -> NoReturn:
    """A dependency the test needs is not here: CI must have everything, so there the test fails; a local
    run skips it, loudly."""
    if IN_CI:
        pytest.fail(f"CI=true and {message}")
    pytest.skip(f"SKIPPING LOUDLY: {message}")


def unavailable(what: str, exc: Exception) -> NoReturn:
    missing(f"{what} is not reachable ({exc}); start it or set the TUNESERVE_TEST_* URL")


def require_module(name: str, install: str) -> ModuleType:
    """``import name``, or missing() with how to get it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"Python module {name} is not importable ({exc}); {install}")


def require_binary(name: str, install: str, *patterns: str) -> str:
    """The path of executable ``name``: the last match, sorted as strings, of the glob ``patterns`` (the newest
    of one series of versions), else the one on PATH; missing() with how to get it when there is none."""
    found = sorted(path for pattern in patterns for path in glob.glob(pattern)) or [shutil.which(name) or ""]
    if not found[-1]:
        missing(f"{name} is not installed; {install}")
    return found[-1]


def reset_caches() -> None:
    for cached in (get_settings, get_engine, get_sessionmaker, get_celery):
        cached.cache_clear()


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

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)

    def start_worker(self, name: str = "worker") -> subprocess.Popen:
        log = (self.log_dir / f"{name}-{len(self.processes)}.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "shared.cli", "worker", "--queues", "ingest,train,batch"],
                                env=self.env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in self.log_dir.glob("*.log"))


def wait_for(predicate: Callable[[], T | Literal[False] | None], timeout: float, interval: float = 0.25,
             what: str = "condition") -> T:
    """The first truthy value ``predicate`` returns within ``timeout`` seconds."""
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
