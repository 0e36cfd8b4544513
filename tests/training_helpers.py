"""What training tests share: the tiny recipe, a dataset cache written without ingestion, a recording
reporter, and queued job rows for ``run_training_job``. Not a test module: tests import it, never each other."""

import random
from pathlib import Path
from typing import Any

import numpy as np

from shared.config import get_settings
from shared.db import session_scope
from shared.jobstate import JobStatus
from shared.modeling.transforms import center_square
from shared.orm import Dataset, Job
from shared.storage import dataset_cache, write_json
from tests.synthetic import make_image

# One pass per epoch (no minimum step count): tests using it are about mechanics, not quality.
# fp32: what these runs compute must not depend on whether the CPU has bf16 (mixed_precision auto); the tests of
# precision itself set it.
TINY: dict[str, Any] = {"base_model": "resnet18", "weights": "none", "image_size": 32, "batch_size": 8, "epochs": 1,
                        "val_fraction": 0.2, "test_fraction": 0.2, "min_steps_per_epoch": 1, "mixed_precision": "off"}


def write_cache(cache_dir: Path, *, classes: list[str], per_class: int, side: int = 40, seed: int = 0,
                shuffle_labels: bool = False) -> Path:
    """The ingestion cache format (images.npy memmap, labels.npy, splits.npy, index.json) from tests.synthetic."""
    rng = random.Random(seed)
    images = np.stack([np.asarray(center_square(make_image(c, rng, 40), side), dtype=np.uint8)
                       for c in classes for _ in range(per_class)])
    labels = np.repeat(np.arange(len(classes)), per_class).astype(np.int64)
    if shuffle_labels:
        labels = np.random.default_rng(seed).permutation(labels)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(cache_dir / "images.npy", images)
    np.save(cache_dir / "labels.npy", labels)
    np.save(cache_dir / "splits.npy", np.full(len(labels), -1, dtype=np.int8))
    write_json(cache_dir / "index.json", {"classes": classes, "cache_size": side})
    return cache_dir


class Recorder:
    """A reporter that keeps what it is told and can ask to stop after a number of finished epochs."""

    def __init__(self, stop_after_epochs: int | None = None) -> None:
        self.stop_after_epochs = stop_after_epochs
        self.epochs: list[int] = []
        self.resumed: list[int] = []
        self.progress_calls: list[dict[str, Any]] = []

    def progress(self, progress: dict[str, Any]) -> None:
        self.progress_calls.append(progress)

    def epoch_done(self, epoch: int, metrics: dict[str, Any]) -> None:
        self.epochs.append(epoch)

    def resumed_after(self, epoch: int, metrics: dict[str, Any]) -> None:
        self.resumed.append(epoch)

    def stop_requested(self) -> bool:
        return self.stop_after_epochs is not None and len(self.epochs) >= self.stop_after_epochs


def ready_dataset_row(*, classes: list[str], per_class: int) -> str:
    """A ready dataset's row and its decoded cache, as ingestion leaves them, without an upload."""
    with session_scope() as session:
        dataset = Dataset(name="colours", status="ready", filename="colours.zip", classes=classes)
        session.add(dataset)
        session.flush()
        dataset_id = dataset.id
    write_cache(dataset_cache(get_settings(), dataset_id), classes=classes, per_class=per_class)
    return dataset_id


def queue(dataset_id: str, **hyperparameters: Any) -> str:
    """A queued job row on ``dataset_id`` with TINY's hyperparameters (and these over them)."""
    with session_scope() as session:
        job = Job(dataset_id=dataset_id, status=JobStatus.queued.value, hyperparameters={**TINY, **hyperparameters})
        session.add(job)
        session.flush()
        return job.id


def load(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None, f"job {job_id} is gone"
        return job
