"""Prometheus metrics, the request middleware that feeds them, and JSON logs carrying request/job ids.

State that lives in the database (jobs by state, queue depth, training speed, the model in service) is
read at scrape time, so every API replica reports the same truth without the workers pushing anything.
The predictor reports its own timings through ``observe_predict_batch``.

With several API processes (``tuneserve api --workers N``) counters and histograms live in
prometheus_client's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``, set by the CLI), so whichever process
answers a scrape reports the sum over all of them. Every answer names its process in ``X-Tuneserve-Process``.
"""

import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import get_principal, require_admin
from api.deps import SettingsDep
from api.services.models import serving_id
from shared.db import get_sessionmaker
from shared.jobstate import JobStatus
from shared.orm import Job, Model, Project

log = logging.getLogger("api.access")

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
job_id_var: ContextVar[str | None] = ContextVar("job_id", default=None)

disable_created_metrics()  # *_created series double the scrape size and nobody graphs them
REGISTRY = CollectorRegistry()
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
HTTP_REQUESTS = Counter("tuneserve_http_requests_total", "HTTP requests by route template, method and status",
                        ["method", "route", "status"], registry=REGISTRY)
HTTP_LATENCY = Histogram("tuneserve_http_request_duration_seconds", "HTTP request latency by route template",
                         ["method", "route"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
PREDICT_LATENCY = Histogram("tuneserve_predict_latency_seconds", "Time to answer one POST /v1/predict request",
                            buckets=LATENCY_BUCKETS, registry=REGISTRY)
PREDICT_BATCH_SIZE = Histogram("tuneserve_predict_batch_size", "Images per model forward pass in the predictor",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=REGISTRY)
PREDICT_BATCH_LATENCY = Histogram("tuneserve_predict_batch_seconds", "Model forward pass time per predictor batch",
                                  buckets=LATENCY_BUCKETS, registry=REGISTRY)
PREDICT_ROUTES = frozenset({"/v1/predict", "/predict", "/v1/projects/{name}/predict"})
_JOB_PATH = re.compile(r"^/v1/jobs/([0-9a-fA-F-]{8,36})(?:/|$)")


def observe_predict_batch(*, size: int, seconds: float) -> None:
    """Hook for the predictor: call once per model forward pass (after micro-batching)."""
    PREDICT_BATCH_SIZE.observe(size)
    PREDICT_BATCH_LATENCY.observe(seconds)


class DatabaseCollector(Collector):
    """Gauges computed from the database at each scrape; a DB outage yields no samples, not an error."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            with get_sessionmaker()() as session:
                counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
                running = session.execute(select(Job.id, Job.progress).where(Job.status == JobStatus.running)).all()
                serving = {name: serving_id(session=session, project=name)
                           for name in session.scalars(select(Project.name)).all()}
                pinned = set(session.scalars(select(Model.id).where(Model.pinned.is_(True))).all())
        except Exception:
            logging.getLogger(__name__).warning("metrics: database unavailable", exc_info=True)
            return
        jobs = GaugeMetricFamily("tuneserve_jobs", "Jobs by state", labels=["state"])
        for state in JobStatus:
            jobs.add_metric([state.value], counts.get(state.value, 0))
        yield jobs
        yield GaugeMetricFamily("tuneserve_queue_depth", "Jobs waiting for a worker",
                                value=counts.get(JobStatus.queued.value, 0))
        speed = GaugeMetricFamily("tuneserve_training_images_per_second",
                                  "Latest training throughput of each running job", labels=["job_id"])
        for job_id, progress in running:
            rate = (progress or {}).get("images_per_second")
            if rate is not None:
                speed.add_metric([job_id], float(rate))
        yield speed
        yield GaugeMetricFamily("tuneserve_training_images_per_second_total",
                                "Training throughput summed over running jobs",
                                value=sum(float((p or {}).get("images_per_second") or 0) for _, p in running))
        model = GaugeMetricFamily("tuneserve_model_in_service", "1 for the model each project serves",
                                  labels=["project", "model_id", "pinned"])
        for name, model_id in sorted(serving.items()):
            if model_id:
                model.add_metric([name, model_id, "true" if model_id in pinned else "false"], 1)
        yield model


DATABASE_COLLECTOR = DatabaseCollector()
REGISTRY.register(DATABASE_COLLECTOR)
# Which API process answered: tells replicas of `--workers N` apart (tests, load balancer debugging).
PROCESS_HEADER = (b"x-tuneserve-process", str(os.getpid()).encode())


def scrape_registry() -> CollectorRegistry:
    """This process's registry, or with several API processes one that sums every process's files."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(DATABASE_COLLECTOR)
    return registry


router = APIRouter(tags=["health"])


@router.get("/metrics", include_in_schema=True, response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(request: Request, settings: SettingsDep) -> Response:
    if not settings.metrics_open:
        require_admin(get_principal(request, settings))
    return Response(generate_latest(scrape_registry()), media_type=CONTENT_TYPE_LATEST)


class ObservabilityMiddleware:
    """Times every request by its route template, tags logs with a request id, echoes ``X-Request-ID``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        offered = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = offered if re.fullmatch(r"[A-Za-z0-9._-]{1,64}", offered) else uuid.uuid4().hex
        job = _JOB_PATH.match(scope.get("path", ""))
        request_token = request_id_var.set(request_id)
        job_token = job_id_var.set(job.group(1) if job else None)
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode()),
                                      PROCESS_HEADER]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = _route_template(scope)
            method = scope.get("method", "GET")
            HTTP_REQUESTS.labels(method, route, str(status)).inc()
            HTTP_LATENCY.labels(method, route).observe(elapsed)
            if route in PREDICT_ROUTES and status == 200:
                PREDICT_LATENCY.observe(elapsed)
            if route != "/metrics":
                log.info("request", extra={"method": method, "route": route, "path": scope.get("path"),
                                           "status": status, "duration_ms": round(elapsed * 1000, 2)})
            request_id_var.reset(request_token)
            job_id_var.reset(job_token)


def _route_template(scope: Scope) -> str:
    """The matched route's path template; unmatched paths share one label so scanners cannot explode it."""
    return getattr(scope.get("route"), "path", None) or "unmatched"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the ids in context and any ``extra`` fields."""

    RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
        }
        for key, var in (("request_id", request_id_var), ("job_id", job_id_var)):
            value = var.get()
            if value is not None:
                entry[key] = value
        entry.update({k: v for k, v in record.__dict__.items() if k not in self.RESERVED})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: int = logging.INFO, loggers: Iterable[str] = ("uvicorn", "uvicorn.error")) -> None:
    """JSON lines on stderr for the root logger; uvicorn's own loggers hand their records to it."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in loggers:
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
