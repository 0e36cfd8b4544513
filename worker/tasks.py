"""Celery tasks: doorways to plain functions. Also wires worker start/stop to the reconciler."""

from typing import Any

from celery import signals

from shared.celery_app import TASK_BATCH, TASK_INGEST, TASK_TRAIN, get_celery
from worker.batch import run_batch
from worker.ingest import ingest_dataset as ingest_dataset_fn
from worker.reliability import SHUTDOWN, start_reconciler
from worker.training.job import run_training_job
from worker.webhooks import start_sender

app = get_celery()


@app.task(name=TASK_INGEST, acks_late=True)
def ingest_dataset(dataset_id: str) -> None:
    ingest_dataset_fn(dataset_id=dataset_id)


@app.task(name=TASK_TRAIN, acks_late=True)
def train(job_id: str) -> None:
    run_training_job(job_id)


@app.task(name=TASK_BATCH, acks_late=True)
def batch_predict(batch_id: str) -> None:
    run_batch(batch_id)


@signals.worker_ready.connect
def _start_background_threads(**_: Any) -> None:
    start_reconciler()
    start_sender(shutdown=SHUTDOWN)


@signals.worker_shutting_down.connect
def _release_running_job(**_: Any) -> None:
    # Celery's warm shutdown would wait for a training task to finish (hours); instead the training
    # loop sees this, checkpoints and releases its job.
    SHUTDOWN.set()
