"""Helpers for tests that drive a live service: a ready dataset, a tiny job, and a server-sent-events reader."""

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg

from tests.processes import CLEAN_SQL, Service, launch, shutdown, wait_for
from tests.synthetic import make_zip

CLASSES = ["red", "green", "blue"]
# Small enough to train in seconds on two shared CPU cores, learnable enough to score well.
TINY_JOB = {"base_model": "resnet18", "weights": "none", "epochs": 2, "image_size": 32, "batch_size": 8,
            "channels_last": False, "min_steps_per_epoch": 1}


@contextmanager
def serve(data_dir: Path, database_url: str, broker_url: str, workers: int = 1, **extra: str) -> Iterator[Service]:
    """The API and workers as subprocesses for a whole test module (start_service is per test), so one
    service and one trained job can back several tests. ``database_url`` is a Postgres URL; it is emptied."""
    env = {**os.environ, "TUNESERVE_DATA_DIR": str(data_dir), "TUNESERVE_DATABASE_URL": database_url,
           "TUNESERVE_BROKER_URL": broker_url, "TUNESERVE_BROKER_KEY_PREFIX": f"test-{uuid.uuid4().hex[:8]}:",
           "TUNESERVE_DEVICE": "cpu", **extra}
    # Rows of earlier tests go; a fresh database has no tables yet (launch() migrates it).
    with psycopg.connect(database_url.replace("+psycopg", ""), autocommit=True) as conn, \
            contextlib.suppress(psycopg.errors.UndefinedTable):
        conn.execute(CLEAN_SQL)
    service = launch(env, data_dir.parent / "logs", workers)
    try:
        yield service
    finally:
        shutdown(service)


def ready_dataset(service: Service, tmp_path: Path, per_class: int = 12) -> dict[str, Any]:
    archive = make_zip(tmp_path / "colours.zip", classes=CLASSES, per_class=per_class, size=32)
    with service.client() as client:
        created = client.post("/v1/datasets", files={"file": ("colours.zip", archive.read_bytes(), "application/zip")})
        assert created.status_code == 202, created.text
        dataset_id = created.json()["id"]
        dataset = wait_for(lambda: (d := client.get(f"/v1/datasets/{dataset_id}").json())["status"] != "processing"
                           and d, 60, what="ingestion")
    assert dataset["status"] == "ready", (dataset, service.logs())
    return dataset


def start_job(service: Service, dataset_id: str, **overrides: Any) -> dict[str, Any]:
    with service.client() as client:
        response = client.post("/v1/jobs", json={"dataset_id": dataset_id, "hyperparameters": TINY_JOB | overrides})
    assert response.status_code == 202, response.text
    return response.json()


def read_events(service: Service, job_id: str, last_event_id: str | None = None, timeout: float = 180,
                auth: dict[str, str] | None = None) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(id, event, data) for every event until the server closes the stream; ``auth``: headers for a service
    with API keys."""
    headers = {**(auth or {}), **({"Last-Event-ID": last_event_id} if last_event_id else {})}
    with httpx.stream("GET", f"{service.url}/v1/jobs/{job_id}/events", headers=headers,
                      timeout=httpx.Timeout(timeout)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event_id, name, data = -1, "message", ""
        for line in response.iter_lines():
            if line.startswith("id:"):
                event_id = int(line[3:])
            elif line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
            elif not line and data:
                yield event_id, name, json.loads(data)
                name, data = "message", ""
