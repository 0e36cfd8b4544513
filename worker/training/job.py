"""Run one training job against the database: claim it, train, record the result, release it."""

import logging
import os
import shutil
import socket
import threading
import time
from typing import Any

import torch
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from shared.config import Settings, get_settings
from shared.db import changed, get_engine, session_scope
from shared.hyperparameters import Hyperparameters
from shared.jobstate import JobStatus, transition
from shared.modeling import IMAGENET_MEAN, IMAGENET_STD, WeightsUnavailable, resize_size_for, save_model_artifact
from shared.orm import Dataset, Job, JobEpoch, Model, new_id, utcnow
from shared.storage import dataset_cache, dataset_dir, job_dir, model_dir, redact_paths
from worker.reliability import SHUTDOWN
from worker.training.auto import resolve
from worker.training.data import CachedDataset, load_cache, stored_splits
from worker.training.engine import FitResult, fit
from worker.training.launch import NotEnoughGpus, fit_distributed, process_count
from worker.training.misclassified import write_thumbnails
from worker.training.optim import compile_pays_off, resolve_device
from worker.training.refit import fit_with_refit

log = logging.getLogger(__name__)

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


class JobReporter:
    """Writes progress and epochs to the job row, keeps the lease alive and notices cancellation."""

    def __init__(self, job_id: str, settings: Settings) -> None:
        self.job_id = job_id
        self.settings = settings
        self._cancel = threading.Event()
        self.lost = threading.Event()  # the reaper gave this job to another worker
        self._stop = threading.Event()
        self._renewed = time.monotonic()  # when this worker last confirmed its lease (claim() just set it)
        self._thread = threading.Thread(target=self._heartbeat, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> "JobReporter":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                self.beat()
            except Exception:  # a DB blip must not kill training; the next beat retries
                log.warning("heartbeat for job %s failed", self.job_id, exc_info=True)

    def _touch(self, **values: Any) -> None:
        """Renew the lease, writing ``values``, only while this worker holds it; notice cancels and loss."""
        asked = time.monotonic()
        with session_scope() as session:
            owned = changed(session, update(Job).where(Job.id == self.job_id, Job.worker_id == WORKER_ID)
                            .values(heartbeat_at=utcnow(), **values)) == 1
            status = session.scalar(select(Job.status).where(Job.id == self.job_id))
        if not owned:
            log.warning("job %s is no longer leased to %s (now %s); stopping", self.job_id, WORKER_ID, status)
            self.lost.set()
            return
        self._renewed = asked
        if status == JobStatus.cancelling:
            self._cancel.set()

    def holds_lease(self) -> bool:
        """False once the job was seen to be another's, or once the lease may have run out unrenewed: a worker
        paused past its lease (a zombie: SIGSTOP, swap, a VM freeze) knows it without asking the database,
        from its first instruction after waking, before its next beat. Until a beat renews it, nothing it
        writes is safe: the reaper may have given the job to another worker, which resumes from the same
        checkpoint files, or ended it."""
        return not self.lost.is_set() and time.monotonic() - self._renewed < self.settings.lease_timeout_seconds

    def beat(self) -> None:
        self._touch()

    def progress(self, progress: dict[str, Any]) -> None:
        self._touch(progress=progress, updated_at=utcnow())

    def epoch_done(self, epoch: int, metrics: dict[str, Any]) -> None:
        if self._record(epoch, metrics):
            log.info("job %s finished epoch %d on %s", self.job_id, epoch, WORKER_ID)

    def resumed_after(self, epoch: int, metrics: dict[str, Any]) -> None:
        if self._record(epoch, metrics):
            log.info("job %s resumes after epoch %d on %s", self.job_id, epoch, WORKER_ID)

    def _record(self, epoch: int, metrics: dict[str, Any]) -> bool:
        """Insert the epoch's row while this worker holds the lease; False (nothing written) once it lost it."""
        values = {"job_id": self.job_id, "epoch": epoch, "metrics": metrics, "created_at": utcnow()}
        insert = pg_insert if get_engine().dialect.name == "postgresql" else sqlite_insert
        with session_scope() as session:
            # Checked in the database, under the row's lock, not by ``lost``: a worker paused past its lease (a
            # zombie: SIGSTOP, swap, a VM freeze) resumes with ``lost`` unset until its next beat, and would
            # otherwise record epochs of a job that another worker now runs or that has already ended.
            held = session.scalar(select(Job.id).where(Job.id == self.job_id, Job.worker_id == WORKER_ID)
                                  .with_for_update())
            if held is None:
                self.lost.set()
                return False
            # A resumed job may re-finish an epoch whose row already landed; keep the first.
            session.execute(insert(JobEpoch).values(**values).on_conflict_do_nothing(
                index_elements=["job_id", "epoch"]))
        return True

    def stop_requested(self) -> bool:
        return self._cancel.is_set() or not self.holds_lease() or SHUTDOWN.is_set()


def claim(*, job_id: str) -> Job | None:
    """Take the job for this worker: queued -> running, or None if it is not ours to run."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None:
            log.warning("job %s does not exist", job_id)
            return None
        if job.status != JobStatus.queued:
            log.info("job %s is %s; this delivery does nothing", job_id, job.status)
            return None
        won = transition(session=session, job_id=job_id, expected=JobStatus.queued, to=JobStatus.running,
                         worker_id=WORKER_ID, heartbeat_at=utcnow(), attempts=job.attempts + 1,
                         started_at=job.started_at or utcnow(), error=None, error_code=None)
    if not won:
        return None
    with session_scope() as session:
        return session.get(Job, job_id)


def _fail(job_id: str, message: str, code: str, settings: Settings) -> None:
    with session_scope() as session:
        failed = any(transition(session=session, job_id=job_id, expected=expected, to=JobStatus.failed,
                                also=Job.worker_id == WORKER_ID, error=message, error_code=code, worker_id=None)
                     for expected in (JobStatus.running, JobStatus.cancelling))
    if failed:  # a failed job never resumes: its checkpoints are only disk used
        shutil.rmtree(job_dir(settings, job_id), ignore_errors=True)


def run_training_job(job_id: str, *, settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    job = claim(job_id=job_id)
    if job is None:
        return
    try:
        with JobReporter(job_id, settings) as reporter:
            _train(job, settings, reporter)
    except (WeightsUnavailable, NotEnoughGpus) as exc:
        _fail(job_id, str(exc), exc.code, settings)
    except Exception as exc:
        log.exception("job %s failed", job_id)
        _fail(job_id, f"training failed: {type(exc).__name__}: {redact_paths(str(exc))}", "training_error", settings)


def _train(job: Job, settings: Settings, reporter: JobReporter) -> None:
    hp = Hyperparameters.model_validate(job.hyperparameters)
    with session_scope() as session:
        dataset = session.get(Dataset, job.dataset_id)
        if dataset is None or dataset.status != "ready":
            raise RuntimeError(f"dataset {job.dataset_id} is not ready")
    data = load_cache(dataset_cache(settings, job.dataset_id))
    work = job_dir(settings, job.id)
    work.mkdir(parents=True, exist_ok=True)
    result = _fit(job=job, hp=hp, data=data, settings=settings, reporter=reporter)
    if result.stopped == "cancelled":
        _hand_back(job=job, reporter=reporter, settings=settings)
    else:
        _publish(job=job, hp=hp, data=data, result=result, settings=settings)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _fit(*, job: Job, hp: Hyperparameters, data: CachedDataset, settings: Settings,
         reporter: JobReporter) -> FitResult:
    """Train in this process, or over ranks when the job asks for several GPUs."""
    splits = stored_splits(splits_dir=dataset_dir(settings, job.dataset_id) / "splits", data=data, hp=hp)
    device = resolve_device(settings.device)
    train_count = int((splits == 0).sum())
    compile_model = compile_pays_off(hp=resolve(hp, train_count=train_count, device=device), device=device,
                                     train_images=train_count)
    work = job_dir(settings, job.id)
    world = process_count(hp, device, allow_cpu=settings.ddp_on_cpu)
    if world > 1:
        return fit_distributed(world=world, hp=hp, cache_dir=dataset_cache(settings, job.dataset_id),
                               classes=data.classes, splits=splits, device=device, work_dir=work,
                               weights_dir=settings.weights_path, reporter=reporter, compile_model=compile_model)
    train = fit_with_refit if hp.refit == "on" else fit
    return train(hp=hp, data=data, splits=splits, device=device, work_dir=work, weights_dir=settings.weights_path,
                 reporter=reporter, compile_model=compile_model,
                 features_dir=dataset_dir(settings, job.dataset_id) / "features", may_write=reporter.holds_lease)


def _hand_back(*, job: Job, reporter: JobReporter, settings: Settings) -> None:
    """A stopped run: the user's cancel ends the job; a worker shutting down hands it back to the queue."""
    mine = Job.worker_id == WORKER_ID
    with session_scope() as session:
        cancelled = not reporter.lost.is_set() and transition(
            session=session, job_id=job.id, expected=JobStatus.cancelling, to=JobStatus.cancelled,
            also=mine, worker_id=None)
        if not cancelled and not reporter.lost.is_set():
            # Not a user's cancel: this worker is shutting down. Hand the job back; it resumes
            # from its last checkpoint wherever the reconciler sends it next.
            transition(session=session, job_id=job.id, expected=JobStatus.running, to=JobStatus.queued,
                       also=mine, worker_id=None, heartbeat_at=None, enqueued_at=None)
    if cancelled:
        shutil.rmtree(job_dir(settings, job.id), ignore_errors=True)


def _publish(*, job: Job, hp: Hyperparameters, data: CachedDataset, result: FitResult, settings: Settings) -> None:
    """The model's files, then its row and the job's success in one transaction (or nothing, if the job was
    cancelled or reaped meanwhile)."""
    mine = Job.worker_id == WORKER_ID
    work = job_dir(settings, job.id)
    model_id = new_id()
    metrics = {"test": result.test, "val": result.val, "best_epoch": result.best_epoch,
               "stopped": result.stopped, "epochs_run": len(result.history), "calibration": result.calibration,
               # What each ``auto`` became, to pin in the next request.
               "hyperparameters": {key: value for key, value in result.hp.model_dump().items()
                                   if hp.model_dump()[key] == "auto"}}
    meta = {
        "model_id": model_id, "job_id": job.id, "dataset_id": job.dataset_id, "base_model": hp.base_model,
        "head": hp.head, "dropout": hp.dropout, "classes": data.classes, "image_size": hp.image_size,
        "resize_size": resize_size_for(hp.image_size), "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "hyperparameters": result.hp.model_dump(), "metrics": metrics, "created_at": utcnow().isoformat(),
        # The predictor divides logits by it; without it (older models) scores are the raw softmax.
        "temperature": result.calibration.get("temperature", 1.0),
    }
    save_model_artifact(directory=model_dir(settings, model_id), model=result.model, meta=meta)
    # Before the model row exists, so nobody is ever pointed at a thumbnail not yet written.
    write_thumbnails(directory=model_dir(settings, model_id), images=data.images,
                     picks=result.test.get("misclassified", []))
    with session_scope() as session:
        session.add(Model(id=model_id, project=job.project, job_id=job.id, dataset_id=job.dataset_id,
                          base_model=hp.base_model,
                          classes=data.classes, image_size=hp.image_size, metrics=metrics))
        session.flush()
        won = transition(session=session, job_id=job.id, expected=JobStatus.running, to=JobStatus.succeeded,
                         also=mine, model_id=model_id, metrics=metrics, worker_id=None)
        if not won:
            # Cancelled in the last moments (the user asked for no model, so none is published), or
            # the job was reaped and belongs to another worker now.
            session.rollback()
            shutil.rmtree(model_dir(settings, model_id), ignore_errors=True)
            with session_scope() as s2:
                cancelled = transition(session=s2, job_id=job.id, expected=JobStatus.cancelling,
                                       to=JobStatus.cancelled, also=mine, worker_id=None)
            if cancelled:
                shutil.rmtree(work, ignore_errors=True)
            return
    shutil.rmtree(work, ignore_errors=True)

