"""Small builders for rows and files that tests need, written through the real ORM."""

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from shared.db import session_scope
from shared.jobstate import DatasetStatus, JobStatus
from shared.orm import Dataset, Job, new_id

T = TypeVar("T")


def ready_dataset(name: str = "ds", project: str = "default",
                  status: DatasetStatus = DatasetStatus.ready) -> str:
    """A dataset row marked ready (or ``status``; its files are not needed by tests that never train on it)."""
    with session_scope() as session:
        dataset = Dataset(id=new_id(), project=project, name=name, status=status.value, filename=f"{name}.zip",
                          size_bytes=1, classes=["a", "b"], class_counts={"a": 5, "b": 5}, num_images=10,
                          rejected=[], report={}, progress={})
        session.add(dataset)
        return dataset.id


def job_row(dataset_id: str, status: JobStatus = JobStatus.queued, project: str = "default") -> str:
    with session_scope() as session:
        job = Job(id=new_id(), project=project, dataset_id=dataset_id, status=status.value, hyperparameters={},
                  progress={})
        session.add(job)
        return job.id


def multipart_bytes(size: int) -> bytes:
    return b"PK\x03\x04" + b"\0" * (size - 4)


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


def model_artifact(*, classes: tuple[str, ...] = ("a", "b"), image_size: int = 32, seed: int = 0) -> str:
    """A real (untrained, seeded) resnet18 artifact on disk plus its Model row; returns the model id."""
    import torch

    from shared.config import get_settings
    from shared.modeling import IMAGENET_MEAN, IMAGENET_STD, build_model, resize_size_for, save_model_artifact
    from shared.orm import Model
    from shared.storage import model_dir

    dataset_id = ready_dataset()
    job_id = job_row(dataset_id, JobStatus.succeeded)
    torch.manual_seed(seed)
    model = build_model(base_model="resnet18", num_classes=len(classes), head="linear")
    model_id = new_id()
    meta = {"model_id": model_id, "base_model": "resnet18", "head": "linear", "dropout": 0.0,
            "classes": list(classes), "image_size": image_size, "resize_size": resize_size_for(image_size),
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    save_model_artifact(directory=model_dir(get_settings(), model_id), model=model.eval(), meta=meta)
    with session_scope() as session:
        session.add(Model(id=model_id, job_id=job_id, dataset_id=dataset_id, base_model="resnet18",
                          classes=list(classes), image_size=image_size, metrics={}))
    return model_id


def project_row(name: str, quota_mb: int | None = None) -> str:
    from shared.orm import Project

    with session_scope() as session:
        session.add(Project(name=name, description="", quota_mb=quota_mb))
    return name


def run_in_threads(calls: Sequence[Callable[[], T]], timeout: float = 60) -> list[T]:
    """Each call in its own thread, all at once; their results in order. An exception raised in a thread is
    re-raised here (the first one in ``calls`` order), where a bare Thread would print it and drop it."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [future.result(timeout=timeout) for future in futures]
