"""Celery tasks: doorways to plain functions."""

from shared.celery_app import TASK_INGEST, TASK_TRAIN, get_celery
from worker.ingest import ingest_dataset as ingest_dataset_fn
from worker.training.job import run_training_job

app = get_celery()


@app.task(name=TASK_INGEST, acks_late=True)
def ingest_dataset(dataset_id: str) -> None:
    ingest_dataset_fn(dataset_id=dataset_id)


@app.task(name=TASK_TRAIN, acks_late=True)
def train(job_id: str) -> None:
    run_training_job(job_id)
