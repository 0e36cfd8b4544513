"""Job operations behind the routes."""

import hashlib
import json

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.errors import ApiError
from api.schemas import JobCreate
from api.services import datasets, get_or_404
from api.services.outbox import dispatch
from shared.celery_app import enqueue_train
from shared.jobstate import FINAL, JobStatus, transition
from shared.orm import Job, JobEpoch, new_id


def _request_hash(body: JobCreate) -> str:
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def create(*, session: Session, body: JobCreate, idempotency_key: str | None, owner: str | None,
           max_active: int) -> Job:
    digest = _request_hash(body)
    if idempotency_key:
        existing = session.scalar(select(Job).where(Job.idempotency_key == idempotency_key))
        if existing is not None:
            return _same_request(existing, digest, idempotency_key)
    if owner is not None:
        active = session.scalar(select(func.count()).where(
            Job.owner == owner, Job.status.in_([JobStatus.queued, JobStatus.running, JobStatus.cancelling]))) or 0
        if active >= max_active:
            raise ApiError(429, "too_many_jobs", f"this API key already has {active} queued or running jobs "
                           f"(limit {max_active}, TUNESERVE_MAX_ACTIVE_JOBS_PER_KEY); wait for some to finish",
                           headers={"Retry-After": "30"})
    dataset = datasets.get(session=session, dataset_id=body.dataset_id)
    if dataset.status != "ready":
        raise ApiError(409, "dataset_not_ready",
                       f"dataset {dataset.id} is {dataset.status}"
                       + (f" ({dataset.error})" if dataset.error else "") + "; wait until it is ready")
    job = Job(id=new_id(), dataset_id=dataset.id, status=JobStatus.queued.value,
              hyperparameters=body.hyperparameters.model_dump(mode="json"), progress={}, attempts=0,
              idempotency_key=idempotency_key, request_hash=digest, owner=owner)
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        # Two requests with the same key raced; the one that committed is the answer.
        session.rollback()
        existing = session.scalar(select(Job).where(Job.idempotency_key == idempotency_key))
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


def get(*, session: Session, job_id: str) -> Job:
    return get_or_404(session, Job, "job", job_id)


def history(*, session: Session, job_id: str) -> list[dict]:
    rows = session.scalars(select(JobEpoch).where(JobEpoch.job_id == job_id).order_by(JobEpoch.epoch)).all()
    return [row.metrics for row in rows]


def list_(*, session: Session, status: str | None, dataset_id: str | None, limit: int, offset: int
          ) -> tuple[list[Job], int]:
    query = select(Job)
    if status:
        query = query.where(Job.status == status)
    if dataset_id:
        query = query.where(Job.dataset_id == dataset_id)
    count = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Job.created_at.desc()).limit(limit).offset(offset)).all()
    return list(rows), count


def cancel(*, session: Session, job_id: str) -> Job:
    job = get(session=session, job_id=job_id)
    for _ in range(3):  # the job may move between our read and our guarded update
        current = JobStatus(job.status)
        if current in FINAL:
            raise ApiError(409, "job_finished", f"job {job_id} is already {current}; it cannot be cancelled")
        if current == JobStatus.cancelling:
            return job
        target = JobStatus.cancelled if current == JobStatus.queued else JobStatus.cancelling
        if transition(session=session, job_id=job_id, expected=current, to=target):
            session.commit()
            break
        session.rollback()
        session.refresh(job)
    return job
