"""Job operations behind the routes."""

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.auth import OPEN, Principal
from api.errors import ApiError
from api.schemas import JobCreate
from api.services import datasets, get_or_404, scoped
from api.services.outbox import dispatch
from shared.celery_app import enqueue_train
from shared.config import Settings
from shared.jobstate import ACTIVE, FINAL, DatasetStatus, JobStatus, transition
from shared.orm import Job, JobEpoch, Model, new_id
from shared.storage import job_dir
from shared.weights import missing_weights


def _request_hash(body: JobCreate) -> str:
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def create(*, session: Session, body: JobCreate, idempotency_key: str | None, principal: Principal,
           max_active: int, weights_dir: Path | None = None) -> Job:
    """``weights_dir``: check up front that a worker sharing this host's caches can load the weights."""
    digest = _request_hash(body)
    # Scoped by principal: another key's Idempotency-Key never finds (or reveals) this key's job.
    scoped_key = f"{principal.id}:{idempotency_key}" if idempotency_key else None
    if scoped_key:
        existing = session.scalar(select(Job).where(Job.idempotency_key == scoped_key))
        if existing is not None:
            return _same_request(existing, digest, idempotency_key or "")
    if principal != OPEN:  # an open service has one user; a cap would only get in its way
        active = session.scalar(select(func.count()).where(Job.owner == principal.id, Job.status.in_(ACTIVE))) or 0
        if active >= max_active:
            raise ApiError(429, "too_many_jobs", f"this API key already has {active} queued or running jobs "
                           f"(limit {max_active}, TUNESERVE_MAX_ACTIVE_JOBS_PER_KEY); wait for some to finish",
                           headers={"Retry-After": "30"})
    dataset = datasets.get(session=session, dataset_id=body.dataset_id, principal=principal)
    if dataset.status != DatasetStatus.ready:
        raise ApiError(409, "dataset_not_ready",
                       f"dataset {dataset.id} is {dataset.status}"
                       + (f" ({dataset.error})" if dataset.error else "") + "; wait until it is ready")
    missing = weights_dir and missing_weights(body.hyperparameters, weights_dir=weights_dir)
    if missing:
        raise ApiError(422, "weights_unavailable", missing)
    job = Job(id=new_id(), project=dataset.project, dataset_id=dataset.id, status=JobStatus.queued.value,
              hyperparameters=body.hyperparameters.model_dump(mode="json"), progress={}, attempts=0,
              idempotency_key=scoped_key, request_hash=digest, owner=principal.id)
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        # Two requests with the same key raced; the one that committed is the answer.
        session.rollback()
        existing = session.scalar(select(Job).where(Job.idempotency_key == scoped_key))
        if existing is None:
            raise
        return _same_request(existing, digest, idempotency_key or "")
    dispatch(session=session, table=Job, row_id=job.id, enqueue=enqueue_train)
    return job


def _same_request(existing: Job, digest: str, key: str) -> Job:
    if existing.request_hash != digest:
        raise ApiError(409, "idempotency_key_reused",
                       f"Idempotency-Key '{key}' was already used for a different request (job {existing.id})")
    return existing


def get(*, session: Session, job_id: str, principal: Principal) -> Job:
    return get_or_404(session, Job, "job", job_id, principal=principal)


def history(*, session: Session, job_id: str) -> list[dict[str, Any]]:
    rows = session.scalars(select(JobEpoch).where(JobEpoch.job_id == job_id).order_by(JobEpoch.epoch)).all()
    return [row.metrics for row in rows]


def epochs_after(*, session: Session, job_id: str, epoch: int) -> list[tuple[int, dict[str, Any]]]:
    """(epoch, metrics) of the job's epochs past ``epoch``, oldest first: what an event stream has not sent."""
    rows = session.execute(select(JobEpoch.epoch, JobEpoch.metrics).where(
        JobEpoch.job_id == job_id, JobEpoch.epoch > epoch).order_by(JobEpoch.epoch)).all()
    return [(number, metrics) for number, metrics in rows]


def list_(*, session: Session, principal: Principal, project: str | None, status: str | None,
          dataset_id: str | None, limit: int, offset: int) -> tuple[list[Job], int]:
    query = scoped(select(Job), Job.project, session=session, principal=principal, project=project)
    if status:
        query = query.where(Job.status == status)
    if dataset_id:
        query = query.where(Job.dataset_id == dataset_id)
    count = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Job.created_at.desc()).limit(limit).offset(offset)).all()
    return list(rows), count


def cancel(*, session: Session, settings: Settings, job_id: str, principal: Principal) -> Job:
    job = get(session=session, job_id=job_id, principal=principal)
    for _ in range(3):  # the job may move between our read and our guarded update
        current = JobStatus(job.status)
        if current in FINAL:
            raise ApiError(409, "job_finished", f"job {job_id} is already {current}; it cannot be cancelled")
        if current == JobStatus.cancelling:
            return job
        target = JobStatus.cancelled if current == JobStatus.queued else JobStatus.cancelling
        if transition(session=session, job_id=job_id, expected=current, to=target):
            session.commit()
            if target == JobStatus.cancelled:  # a requeued job may hold a checkpoint from its first attempt
                shutil.rmtree(job_dir(settings, job_id), ignore_errors=True)
            break
        session.rollback()
        session.refresh(job)
    return job


def delete(*, session: Session, settings: Settings, job_id: str, principal: Principal) -> None:
    """Remove a finished job, its history and its checkpoints; its model (if any) must go first."""
    job = get(session=session, job_id=job_id, principal=principal)
    if JobStatus(job.status) not in FINAL:
        raise ApiError(409, "job_active", f"job {job_id} is {job.status}; cancel it and wait until it is cancelled")
    model_id = session.scalar(select(Model.id).where(Model.job_id == job_id).limit(1))
    if model_id is not None:
        raise ApiError(409, "job_has_model", f"job {job_id} produced model {model_id}, which is still in the "
                       f"registry; DELETE /v1/models/{model_id} first")
    session.delete(job)
    session.commit()
    shutil.rmtree(job_dir(settings, job_id), ignore_errors=True)
