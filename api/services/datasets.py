"""Dataset operations behind the routes."""

import os
import shutil

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.auth import Principal
from api.errors import ApiError, not_found
from api.services import get_or_404, scoped
from api.services.outbox import dispatch
from api.uploads import SavedFile
from shared.archives import archive_format
from shared.celery_app import enqueue_ingest
from shared.config import Settings
from shared.jobstate import ACTIVE, DATASET_DELETED, DatasetStatus
from shared.orm import BatchPrediction, Dataset, Job, new_id
from shared.storage import dataset_dir, dataset_upload

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


def create(*, session: Session, settings: Settings, upload: SavedFile, name: str | None, project: str) -> Dataset:
    """A dataset in ``project`` (already checked: visible to the caller and within its quota)."""
    kind = archive_format(upload.path)
    if kind is None:
        raise ApiError(415, "not_an_archive",
                       f"'{upload.filename}' is not a .zip, .tar or .tar.gz archive; zip a folder with one "
                       "sub-folder per class and upload that")
    dataset_id = new_id()
    target = dataset_upload(settings, dataset_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(upload.path, target)
    stem = upload.filename
    for suffix in ARCHIVE_SUFFIXES:
        stem = stem.removesuffix(suffix)
    dataset = Dataset(id=dataset_id, project=project, name=(name or stem or dataset_id)[:255],
                      status=DatasetStatus.processing, filename=upload.filename[:255], size_bytes=upload.size,
                      rejected=[], report={}, progress={"processed": 0, "total": None})
    session.add(dataset)
    try:
        session.commit()
    except BaseException:
        shutil.rmtree(target.parent, ignore_errors=True)  # no row points at it: it would never be removed
        raise
    dispatch(session=session, table=Dataset, row_id=dataset_id, enqueue=enqueue_ingest)
    return dataset


def get(*, session: Session, dataset_id: str, principal: Principal) -> Dataset:
    dataset = get_or_404(session, Dataset, "dataset", dataset_id, principal=principal)
    if dataset.status == DATASET_DELETED:
        raise not_found("dataset", dataset_id)
    return dataset


def list_(*, session: Session, principal: Principal, project: str | None, status: DatasetStatus | None, limit: int,
          offset: int) -> tuple[list[Dataset], int]:
    query = scoped(select(Dataset).where(Dataset.status != DATASET_DELETED), Dataset.project, session=session,
                   principal=principal, project=project)
    if status:
        query = query.where(Dataset.status == status)
    count = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Dataset.created_at.desc()).limit(limit).offset(offset)).all()
    return list(rows), count


def delete(*, session: Session, settings: Settings, dataset_id: str, principal: Principal) -> None:
    dataset = get(session=session, dataset_id=dataset_id, principal=principal)
    active = session.scalar(select(func.count()).where(
        Job.dataset_id == dataset_id,
        Job.status.in_(ACTIVE)))
    if active:
        raise ApiError(409, "dataset_in_use", f"dataset {dataset_id} is used by {active} queued or running job(s); "
                       "cancel them or wait for them to finish")
    batches = session.scalar(select(func.count()).where(BatchPrediction.dataset_id == dataset_id,
                                                        BatchPrediction.status.in_(ACTIVE)))
    if batches:  # they read the dataset's upload
        raise ApiError(409, "dataset_in_use", f"dataset {dataset_id} is used by {batches} queued or running batch "
                       "prediction(s); cancel them or wait for them to finish")
    used = session.scalar(select(func.count()).where(Job.dataset_id == dataset_id))
    if used:
        # Finished jobs keep their history; the dataset's files go, the row is marked deleted.
        dataset.status = DATASET_DELETED
    else:
        session.delete(dataset)
    session.commit()
    shutil.rmtree(dataset_dir(settings, dataset_id), ignore_errors=True)
