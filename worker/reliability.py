"""Keeps jobs moving when processes die: requeue jobs whose worker went silent, and (re)send
messages for rows the broker never got. Runs as a thread in every worker; every change is a
guarded UPDATE, so any number of workers can run it at once."""

import logging
import shutil
import threading
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update

from shared import batchstate
from shared.celery_app import enqueue_batch, enqueue_ingest, enqueue_train
from shared.config import Settings, get_settings
from shared.db import changed, session_scope
from shared.jobstate import FINAL, DatasetStatus, JobStatus, transition
from shared.orm import BatchPrediction, Dataset, Job, utcnow
from shared.storage import batch_dir, job_dir

log = logging.getLogger(__name__)

# Set when the worker is asked to stop (SIGTERM): the running job checkpoints and goes back to queued.
SHUTDOWN = threading.Event()

# A freshly created row gets this long for the API to send its message before it counts as orphaned.
SEND_GRACE_SECONDS = 5


def reap_stale_jobs(*, settings: Settings) -> list[str]:
    """Running jobs whose heartbeat stopped: back to queued (to resume from their checkpoint), or
    failed once they have used up ``job_max_attempts``. Returns the ids that moved."""
    cutoff = utcnow() - timedelta(seconds=settings.lease_timeout_seconds)
    moved = []
    with session_scope() as session:
        stale = session.execute(
            select(Job.id, Job.status, Job.attempts, Job.heartbeat_at).where(
                Job.status.in_([JobStatus.running, JobStatus.cancelling]),
                or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff))
        ).all()
    for job_id, status, attempts, beat in stale:
        unchanged = Job.heartbeat_at.is_(None) if beat is None else Job.heartbeat_at == beat
        with session_scope() as session:
            if status == JobStatus.cancelling:
                won = transition(session=session, job_id=job_id, expected=JobStatus.cancelling,
                                 to=JobStatus.cancelled, also=unchanged, worker_id=None)
            elif attempts >= settings.job_max_attempts:
                won = transition(session=session, job_id=job_id, expected=JobStatus.running, to=JobStatus.failed,
                                 also=unchanged, worker_id=None, error_code="worker_lost",
                                 error=f"the worker running this job stopped responding {attempts} times "
                                       f"(TUNESERVE_JOB_MAX_ATTEMPTS={settings.job_max_attempts}); see the worker logs")
            else:
                won = transition(session=session, job_id=job_id, expected=JobStatus.running, to=JobStatus.queued,
                                 also=unchanged, worker_id=None, heartbeat_at=None, enqueued_at=None)
        if won:
            log.warning("job %s lost its worker (last heartbeat %s); it was %s", job_id, beat, status)
            moved.append(job_id)
            with session_scope() as session:
                final = session.scalar(select(Job.status).where(Job.id == job_id)) in FINAL
            if final:  # failed or cancelled: it will never resume, so its checkpoints only take disk
                shutil.rmtree(job_dir(settings, job_id), ignore_errors=True)
    return moved


def reap_stale_batches(*, settings: Settings) -> list[str]:
    """As ``reap_stale_jobs``, for batch predictions: a requeued batch resumes after its last written chunk."""
    cutoff = utcnow() - timedelta(seconds=settings.lease_timeout_seconds)
    table = BatchPrediction
    moved = []
    with session_scope() as session:
        stale = session.execute(select(table.id, table.status, table.attempts, table.heartbeat_at).where(
            table.status.in_([JobStatus.running, JobStatus.cancelling]),
            or_(table.heartbeat_at.is_(None), table.heartbeat_at < cutoff))).all()
    for batch_id, status, attempts, beat in stale:
        unchanged = table.heartbeat_at.is_(None) if beat is None else table.heartbeat_at == beat
        with session_scope() as session:
            fields: dict[str, Any] = {}
            if status == JobStatus.cancelling:
                to = JobStatus.cancelled
            elif attempts >= settings.job_max_attempts:
                to, fields = JobStatus.failed, {
                    "error_code": "worker_lost",
                    "error": f"the worker running this batch stopped responding {attempts} times "
                             f"(TUNESERVE_JOB_MAX_ATTEMPTS={settings.job_max_attempts}); see the worker logs"}
            else:
                to, fields = JobStatus.queued, {"heartbeat_at": None, "enqueued_at": None}
            won = batchstate.transition(session=session, batch_id=batch_id, expected=JobStatus(status), to=to,
                                        also=unchanged, worker_id=None, **fields)
        if won:
            log.warning("batch %s lost its worker (last heartbeat %s); it was %s, now %s", batch_id, beat, status, to)
            moved.append(batch_id)
            if to in FINAL:  # it will never resume: its upload and chunks only take disk
                shutil.rmtree(batch_dir(settings, batch_id), ignore_errors=True)
    return moved


def send_unsent() -> list[str]:
    """Send a message for every queued job or batch / processing dataset the broker never got. The guarded
    UPDATE on ``enqueued_at`` makes exactly one reconciler send each."""
    grace = utcnow() - timedelta(seconds=SEND_GRACE_SECONDS)
    sent = []
    for table, status, enqueue in ((Job, JobStatus.queued.value, enqueue_train),
                                   (Dataset, DatasetStatus.processing.value, enqueue_ingest),
                                   (BatchPrediction, JobStatus.queued.value, enqueue_batch)):
        with session_scope() as session:
            ids = session.scalars(select(table.id).where(
                table.status == status, table.enqueued_at.is_(None), table.created_at < grace)).all()
        for row_id in ids:
            with session_scope() as session:
                claimed = changed(session, update(table).where(
                    table.id == row_id, table.status == status, table.enqueued_at.is_(None)
                ).values(enqueued_at=utcnow())) == 1
            if not claimed:
                continue
            try:
                enqueue(row_id)
                sent.append(row_id)
            except Exception:
                log.warning("broker unavailable; %s %s stays unsent for now", table.__tablename__, row_id)
                with session_scope() as session:
                    session.execute(update(table).where(table.id == row_id).values(enqueued_at=None))
                break
    return sent


def reconcile_once(*, settings: Settings) -> None:
    reap_stale_jobs(settings=settings)
    reap_stale_batches(settings=settings)
    send_unsent()


def start_reconciler(settings: Settings | None = None) -> threading.Event:
    """Run ``reconcile_once`` every ``reconcile_interval_seconds`` in a daemon thread; set the
    returned event to stop it."""
    settings = settings or get_settings()
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(settings.reconcile_interval_seconds):
            if SHUTDOWN.is_set():
                # A worker on its way out must not send: its own consumer could take the message and
                # exit holding it unacked, where it stays until the visibility timeout (12 h).
                return
            try:
                reconcile_once(settings=settings)
            except Exception:
                log.warning("reconcile pass failed; retrying next interval", exc_info=True)

    threading.Thread(target=loop, name="reconciler", daemon=True).start()
    return stop
