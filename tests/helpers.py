"""Small builders for rows and files that tests need, written through the real ORM."""

from pathlib import Path

from shared.db import session_scope
from shared.jobstate import JobStatus
from shared.orm import Dataset, Job, new_id


def ready_dataset(name: str = "ds") -> str:
    """A dataset row marked ready (its files are not needed by tests that never train on it)."""
    with session_scope() as session:
        dataset = Dataset(id=new_id(), name=name, status="ready", filename=f"{name}.zip", size_bytes=1,
                          classes=["a", "b"], class_counts={"a": 5, "b": 5}, num_images=10, rejected=[], report={},
                          progress={})
        session.add(dataset)
        return dataset.id


def job_row(dataset_id: str, status: JobStatus = JobStatus.queued) -> str:
    with session_scope() as session:
        job = Job(id=new_id(), dataset_id=dataset_id, status=status.value, hyperparameters={}, progress={})
        session.add(job)
        return job.id


def multipart_bytes(size: int) -> bytes:
    return b"PK\x03\x04" + b"\0" * (size - 4)


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []
