"""Server verbs: migrate, api, worker, dev."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from typing import Annotated

import typer

from shared.cli_app import app
from shared.config import get_settings


@app.command()
def migrate() -> None:
    """Upgrade the database schema to the newest revision."""
    from shared.migrate import upgrade

    upgrade()


def _serve(host: str, port: int, log_level: str, workers: int = 1) -> None:
    import uvicorn

    settings = get_settings()
    metrics_dir = None
    if workers > 1:
        # Each worker process reads these when it starts: the split of the API-wide caps, and where
        # prometheus_client keeps its counters so that any process's /metrics reports all of them.
        metrics_dir = tempfile.mkdtemp(prefix="tuneserve-metrics-")
        os.environ.update(TUNESERVE_API_WORKERS=str(workers), PROMETHEUS_MULTIPROC_DIR=metrics_dir)
    try:
        # The API logs JSON lines itself (one per request), so uvicorn's access log and log config stay off.
        # Past limit_concurrency connections uvicorn answers 503 instead of queueing without bound; idle
        # keep-alive connections and half-sent request heads are dropped rather than held. A worker busy with
        # inference on a loaded machine may take seconds to answer the supervisor's ping: it is not hung.
        uvicorn.run("api.main:app", host=host, port=port, log_level=log_level, proxy_headers=True, log_config=None,
                    access_log=False, limit_concurrency=settings.http_max_connections, timeout_keep_alive=15,
                    h11_max_incomplete_event_size=64 * 1024, timeout_graceful_shutdown=30, workers=workers,
                    timeout_worker_healthcheck=30)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


Host = Annotated[str, typer.Option("--host", help="interface to listen on")]
Port = Annotated[int, typer.Option("--port", help="TCP port")]
LogLevel = Annotated[str, typer.Option("--log-level", help="uvicorn log level")]


Workers = Annotated[int, typer.Option("--workers", envvar="TUNESERVE_API_WORKERS", min=1, max=64,
                                       help="API processes, each with its own predictor on the same device")]


@app.command()
def api(host: Host = "127.0.0.1", port: Port = 8000, log_level: LogLevel = "info", workers: Workers = 1) -> None:
    """Serve the HTTP API."""
    _serve(host, port, log_level, workers)


@app.command()
def worker(queues: Annotated[str, typer.Option("--queues", help="comma-separated: ingest, train, batch")
                             ] = "ingest,train,batch",
           name: Annotated[str | None, typer.Option("--name", help="worker name prefix")] = None,
           log_level: Annotated[str, typer.Option("--log-level")] = "INFO") -> None:
    """Run a Celery worker (solo pool: one job at a time, one per GPU)."""
    from shared.celery_app import get_celery

    argv = ["worker", "--pool=solo", "--concurrency=1", f"--queues={queues}", f"--loglevel={log_level}",
            f"--hostname={name or 'tuneserve'}-{os.getpid()}@{socket.gethostname()}", "--without-gossip",
            "--without-mingle"]
    get_celery().worker_main(argv)


@app.command()
def dev(host: Host = "127.0.0.1", port: Port = 8000, log_level: LogLevel = "info") -> None:
    """Migrate, then run the API and one worker (embedded defaults); Ctrl-C stops both."""
    migrate()
    child = subprocess.Popen([sys.executable, "-m", "shared.cli", "worker", "--queues", "ingest,train,batch"])
    try:
        _serve(host, port, log_level)
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
