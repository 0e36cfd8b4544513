"""Webhook events: what a hook can ask for, the outbox rows a state change writes, and the signature.

A resource reaching a final state calls ``record`` with the session of the guarded UPDATE that moved
it, so the event exists if and only if that change committed. A worker thread (worker.webhooks) sends
each (event, hook) pair later, retrying until a 2xx.
"""

import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any, Literal, get_args

from pydantic import TypeAdapter
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.orm import BatchPrediction, Dataset, Job, JobEpoch, Webhook, WebhookDelivery, WebhookEvent, new_id, utcnow

WebhookEventType = Literal["dataset.ready", "dataset.failed", "job.succeeded", "job.failed", "job.cancelled",
                           "batch.succeeded", "batch.failed"]
EVENT_TYPES: tuple[str, ...] = get_args(WebhookEventType)
DeliveryStatus = Literal["pending", "delivered", "failed"]
SIGNATURE_HEADER = "Tuneserve-Signature"
EVENT_ID_HEADER = "Tuneserve-Event-Id"

# The public bodies the API answers with (api.schemas DatasetPublic / JobPublic, which shared may not
# import); tests/test_webhooks.py checks these stay equal to them.
DATASET_FIELDS = ("id", "project", "name", "status", "filename", "size_bytes", "classes", "class_counts", "splits",
                  "num_images", "rejected", "report", "progress", "error", "error_code", "created_at", "updated_at")
JOB_FIELDS = ("id", "project", "dataset_id", "status", "hyperparameters", "progress", "history", "metrics", "error",
              "error_code", "model_id", "attempts", "created_at", "updated_at", "started_at", "finished_at")
BATCH_FIELDS = ("id", "project", "status", "source", "dataset_id", "filename", "size_bytes", "model_id", "top_k",
                "progress", "error", "error_code", "attempts", "created_at", "updated_at", "started_at", "finished_at")
JOB_PROGRESS = {"epoch": 0, "epochs": 0, "step": 0, "steps": 0, "images_per_second": None, "eta_seconds": None}

_JSON = TypeAdapter(dict[str, Any])


def sign(*, secret: str, timestamp: int, body: bytes) -> str:
    """The ``Tuneserve-Signature`` value: HMAC-SHA256 of "<timestamp>.<raw body>" under the hook's secret."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def dataset_body(session: Session, dataset_id: str) -> dict[str, Any]:
    # Read through the table, not the ORM identity map: the caller's session may hold the row as it was
    # before its guarded UPDATE.
    row = session.execute(select(Dataset.__table__).where(Dataset.id == dataset_id)).mappings().one()
    return {field: row[field] for field in DATASET_FIELDS}


def job_body(session: Session, job_id: str) -> dict[str, Any]:
    row = session.execute(select(Job.__table__).where(Job.id == job_id)).mappings().one()
    body = {field: row[field] for field in JOB_FIELDS if field != "history"}
    progress = row["progress"] or {}
    body["progress"] = {key: progress.get(key, default) for key, default in JOB_PROGRESS.items()}
    body["history"] = list(session.scalars(
        select(JobEpoch.metrics).where(JobEpoch.job_id == job_id).order_by(JobEpoch.epoch)))
    return body


def batch_body(session: Session, batch_id: str) -> dict[str, Any]:
    row = session.execute(select(BatchPrediction.__table__).where(BatchPrediction.id == batch_id)).mappings().one()
    body = {field: row[field] for field in BATCH_FIELDS if field != "progress"}
    body["progress"] = {"total": row["total"], "done": row["done"], "rejected": row["rejected"]}
    return body


def record(*, session: Session, project: str, type: str, resource_id: str,
           data: Callable[[], dict[str, Any]]) -> str | None:
    """Write the event and one pending delivery per hook of ``project`` that asked for ``type``, in the
    caller's transaction. Returns the event id, or None when no hook wants it: then nothing is written
    and ``data`` (the resource's public body) is never built."""
    if type not in EVENT_TYPES:
        raise ValueError(f"unknown webhook event type {type!r}")
    hooks = [hook_id for hook_id, events in session.execute(
        select(Webhook.id, Webhook.events).where(Webhook.project == project)) if type in events]
    if not hooks:
        return None
    event_id, now = new_id(), utcnow()
    payload = {"id": event_id, "type": type, "created_at": now, "data": data()}
    body = json.dumps(_JSON.dump_python(payload, mode="json"), separators=(",", ":"))
    session.add(WebhookEvent(id=event_id, project=project, type=type, resource_id=resource_id, body=body,
                             created_at=now))
    session.flush()  # the event row first: deliveries point at it
    session.add_all([WebhookDelivery(event_id=event_id, hook_id=hook_id, status="pending", attempts=0,
                                     next_attempt_at=now, created_at=now) for hook_id in hooks])
    session.flush()
    return event_id


def job_finished(*, session: Session, job_id: str, status: str) -> str | None:
    project = session.scalar(select(Job.project).where(Job.id == job_id))
    if project is None:
        return None
    return record(session=session, project=project, type=f"job.{status}", resource_id=job_id,
                  data=lambda: job_body(session, job_id))


def dataset_finished(*, session: Session, dataset_id: str, status: str) -> str | None:
    project = session.scalar(select(Dataset.project).where(Dataset.id == dataset_id))
    if project is None:
        return None
    return record(session=session, project=project, type=f"dataset.{status}", resource_id=dataset_id,
                  data=lambda: dataset_body(session, dataset_id))


def batch_finished(*, session: Session, batch_id: str, status: str) -> str | None:
    """Succeeded and failed batches are events; a cancelled one is not (its user asked for it)."""
    project = session.scalar(select(BatchPrediction.project).where(BatchPrediction.id == batch_id))
    if project is None or f"batch.{status}" not in EVENT_TYPES:
        return None
    return record(session=session, project=project, type=f"batch.{status}", resource_id=batch_id,
                  data=lambda: batch_body(session, batch_id))
