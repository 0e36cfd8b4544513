"""The Celery app object. The API only sends by task name; the worker registers the tasks."""

from functools import lru_cache
from typing import Any

from celery import Celery

from shared.config import Settings, get_settings

TASK_INGEST = "tuneserve.ingest_dataset"
TASK_TRAIN = "tuneserve.train"
TASK_BATCH = "tuneserve.batch_predict"
QUEUE_INGEST = "ingest"
QUEUE_TRAIN = "train"
QUEUE_BATCH = "batch"


def broker_options(settings: Settings) -> dict[str, Any]:
    if settings.broker.startswith("filesystem"):
        folder = settings.broker_dir
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }
    options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout_seconds}
    if settings.broker_key_prefix:
        options["global_keyprefix"] = settings.broker_key_prefix
    return options


def make_celery(settings: Settings) -> Celery:
    app = Celery("tuneserve", broker=settings.broker, include=["worker.tasks"])
    app.conf.update(
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        # Fail a publish fast when the broker is down: the row stays unsent and the reconciler sends it later.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue=QUEUE_TRAIN,
        task_routes={TASK_INGEST: {"queue": QUEUE_INGEST}, TASK_TRAIN: {"queue": QUEUE_TRAIN},
                     TASK_BATCH: {"queue": QUEUE_BATCH}},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_serializer="json",
        accept_content=["json"],
        # Workers learn about cancellation from the DB, not from remote control.
        worker_enable_remote_control=False,
    )
    return app


@lru_cache
def get_celery() -> Celery:
    return make_celery(get_settings())


def enqueue_ingest(dataset_id: str) -> None:
    get_celery().send_task(TASK_INGEST, args=[dataset_id], queue=QUEUE_INGEST)


def enqueue_train(job_id: str) -> None:
    get_celery().send_task(TASK_TRAIN, args=[job_id], queue=QUEUE_TRAIN)


def enqueue_batch(batch_id: str) -> None:
    get_celery().send_task(TASK_BATCH, args=[batch_id], queue=QUEUE_BATCH)
