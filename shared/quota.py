"""What a project holds on disk, and how much more its quota allows."""

import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.config import Settings
from shared.jobstate import DATASET_DELETED
from shared.orm import BatchPrediction, Dataset, Job, Model, Project
from shared.storage import batch_dir, dataset_dir, job_dir, model_dir


@dataclass(frozen=True)
class Usage:
    datasets: int
    jobs: int
    models: int
    bytes: int


def tree_bytes(path: Path) -> int:
    """Bytes in the regular files under ``path`` (links are not followed; a missing path is 0)."""
    total = 0
    stack = [path]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:  # removed while we walked
                continue
    return total


def project_usage(*, session: Session, settings: Settings, project: str) -> Usage:
    dataset_ids = session.scalars(select(Dataset.id).where(Dataset.project == project)).all()
    job_ids = session.scalars(select(Job.id).where(Job.project == project)).all()
    model_ids = session.scalars(select(Model.id).where(Model.project == project)).all()
    batch_ids = session.scalars(select(BatchPrediction.id).where(BatchPrediction.project == project)).all()
    live = session.scalar(select(func.count()).where(Dataset.project == project,
                                                     Dataset.status != DATASET_DELETED)) or 0
    on_disk = (sum(tree_bytes(dataset_dir(settings, i)) for i in dataset_ids)
               + sum(tree_bytes(job_dir(settings, i)) for i in job_ids)
               + sum(tree_bytes(model_dir(settings, i)) for i in model_ids)
               + sum(tree_bytes(batch_dir(settings, i)) for i in batch_ids))
    return Usage(datasets=live, jobs=len(job_ids), models=len(model_ids), bytes=on_disk)


def remaining_bytes(*, session: Session, settings: Settings, project: str) -> int | None:
    """Bytes the project may still add; None when it has no quota."""
    quota_mb = session.scalar(select(Project.quota_mb).where(Project.name == project))
    if quota_mb is None:
        return None
    used = project_usage(session=session, settings=settings, project=project).bytes
    return max(0, quota_mb * 2**20 - used)
