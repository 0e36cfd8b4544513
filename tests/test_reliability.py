"""The lease, the reaper and the reconciler, driven directly against real Postgres and Redis."""

from datetime import timedelta

import redis
from sqlalchemy import update

from shared.config import get_settings
from shared.db import session_scope
from shared.jobstate import JobStatus
from shared.orm import Dataset, Job, utcnow
from tests.helpers import job_row, ready_dataset
from worker.reliability import reap_stale_jobs, send_unsent
from worker.training.job import run_training_job


def set_job(job_id: str, **values) -> None:
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def get_job(job_id: str) -> Job:
    with session_scope() as session:
        return session.get_one(Job, job_id)


def test_second_delivery_of_a_running_job_does_nothing(migrated):
    job_id = job_row(ready_dataset(), JobStatus.running)
    set_job(job_id, attempts=1, worker_id="other-host:1", heartbeat_at=utcnow())
    run_training_job(job_id)
    job = get_job(job_id)
    assert (job.status, job.attempts, job.worker_id) == ("running", 1, "other-host:1")


def test_delivery_of_a_finished_job_does_nothing(migrated):
    job_id = job_row(ready_dataset(), JobStatus.cancelled)
    run_training_job(job_id)
    assert get_job(job_id).status == "cancelled" and get_job(job_id).attempts == 0


def test_reaper_requeues_a_job_whose_heartbeat_stopped(migrated):
    stale, fresh = job_row(ready_dataset(), JobStatus.running), job_row(ready_dataset(), JobStatus.running)
    long_ago = utcnow() - timedelta(seconds=get_settings().lease_timeout_seconds + 5)
    set_job(stale, attempts=1, worker_id="dead:1", heartbeat_at=long_ago, enqueued_at=long_ago)
    set_job(fresh, attempts=1, worker_id="alive:1", heartbeat_at=utcnow())
    assert reap_stale_jobs(settings=get_settings()) == [stale]
    job = get_job(stale)
    assert (job.status, job.worker_id, job.enqueued_at, job.attempts) == ("queued", None, None, 1)
    assert get_job(fresh).status == "running"


def test_reaper_fails_a_job_that_used_up_its_attempts(migrated):
    job_id = job_row(ready_dataset(), JobStatus.running)
    max_attempts = get_settings().job_max_attempts
    set_job(job_id, attempts=max_attempts, worker_id="dead:1", heartbeat_at=utcnow() - timedelta(hours=1))
    reap_stale_jobs(settings=get_settings())
    job = get_job(job_id)
    assert job.status == "failed" and job.error_code == "worker_lost"
    assert f"{max_attempts} times" in job.error


def test_reaper_finishes_a_cancel_whose_worker_died(migrated):
    job_id = job_row(ready_dataset(), JobStatus.cancelling)
    set_job(job_id, attempts=1, worker_id="dead:1", heartbeat_at=utcnow() - timedelta(hours=1))
    reap_stale_jobs(settings=get_settings())
    assert get_job(job_id).status == "cancelled"


def test_reconciler_sends_each_unsent_row_exactly_once(migrated):
    settings = get_settings()
    old = utcnow() - timedelta(minutes=1)
    unsent = job_row(ready_dataset(), JobStatus.queued)
    sent_already = job_row(ready_dataset(), JobStatus.queued)
    just_created = job_row(ready_dataset(), JobStatus.queued)
    set_job(unsent, created_at=old)
    set_job(sent_already, created_at=old, enqueued_at=old)
    dataset_id = ready_dataset("unsent")
    with session_scope() as session:
        session.execute(update(Dataset).where(Dataset.id == dataset_id)
                        .values(status="processing", created_at=old, enqueued_at=None))
    assert sorted(send_unsent()) == sorted([unsent, dataset_id])
    assert send_unsent() == []
    assert get_job(unsent).enqueued_at is not None and get_job(just_created).enqueued_at is None
    broker = redis.Redis.from_url(settings.broker)
    prefix = settings.broker_key_prefix
    assert broker.llen(f"{prefix}train") == 1
    assert broker.llen(f"{prefix}ingest") == 1


def test_a_worker_that_is_shutting_down_sends_nothing(migrated):
    """Its own consumer could take the message and exit holding it unacked for the visibility timeout."""
    import time

    from worker.reliability import SHUTDOWN, start_reconciler

    job_id = job_row(ready_dataset())
    set_job(job_id, created_at=utcnow() - timedelta(minutes=1))
    settings = get_settings().model_copy(update={"reconcile_interval_seconds": 0.05})
    SHUTDOWN.set()
    try:
        stop = start_reconciler(settings)
        time.sleep(0.5)
        stop.set()
    finally:
        SHUTDOWN.clear()
    assert get_job(job_id).enqueued_at is None
    stop = start_reconciler(settings)  # the same job is sent by a worker that is not leaving
    try:
        deadline = time.monotonic() + 10
        while get_job(job_id).enqueued_at is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
    assert get_job(job_id).enqueued_at is not None
