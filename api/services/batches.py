"""Batch prediction operations behind the routes. The work itself runs on a worker (``worker.batch``)."""

import os
import shutil
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.auth import OPEN, Principal
from api.errors import ApiError
from api.services import datasets, get_or_404, models, project_or_404, scoped
from api.services.outbox import dispatch
from api.uploads import SavedFile
from shared.archives import archive_format
from shared.batchstate import BatchStatus, transition
from shared.celery_app import enqueue_batch
from shared.config import Settings
from shared.jobstate import ACTIVE, FINAL, DatasetStatus
from shared.orm import DEFAULT_PROJECT, BatchPrediction, Model, new_id
from shared.quota import remaining_bytes
from shared.storage import batch_dir

RESULT_FORMATS = ("csv", "jsonl")


def _model(*, session: Session, principal: Principal, project: str, model_id: str | None) -> Model:
    """``model_id`` if it is a model of ``project``, else what the project serves now."""
    if model_id:
        model = models.get(session=session, model_id=model_id, principal=principal)
        if model.project != project:
            raise ApiError(404, "model_not_found", f"project '{project}' has no model {model_id}")
        return model
    serving = models.serving_id(session=session, project=project)
    if serving is None:
        # 409, not /predict's 503: retrying will not help until a training job in this project succeeds.
        raise ApiError(409, "no_model", f"project '{project}' has no trained model yet; POST /v1/jobs and wait "
                       "for it to succeed, or name a model_id")
    return models.get(session=session, model_id=serving, principal=principal)


def _check_active(*, session: Session, principal: Principal, max_active: int) -> None:
    if principal == OPEN:  # an open service has one user; a cap would only get in its way
        return
    active = session.scalar(select(func.count()).where(BatchPrediction.owner == principal.id,
                                                       BatchPrediction.status.in_(ACTIVE))) or 0
    if active >= max_active:
        raise ApiError(429, "too_many_batches", f"this API key already has {active} queued or running batch "
                       f"predictions (limit {max_active}, TUNESERVE_MAX_ACTIVE_JOBS_PER_KEY); wait for some to "
                       "finish", headers={"Retry-After": "30"})


def create(*, session: Session, settings: Settings, principal: Principal, project: str | None, top_k: int,
           model_id: str | None, dataset_id: str | None, upload: SavedFile | None) -> BatchPrediction:
    """A queued batch over ``upload`` (an archive) or a ready dataset's images, with its model pinned now."""
    if dataset_id and upload is not None:
        raise ApiError(422, "source_conflict", "send either an archive in the multipart field 'file' or a "
                       "dataset_id, not both")
    _check_active(session=session, principal=principal, max_active=settings.max_active_jobs_per_key)
    if upload is not None:
        project = project or DEFAULT_PROJECT
        project_or_404(session, project, principal=principal)
        _check_archive(session=session, settings=settings, project=project, upload=upload)
    elif dataset_id:
        dataset = datasets.get(session=session, dataset_id=dataset_id, principal=principal)
        if project is not None and project != dataset.project:
            raise ApiError(422, "validation_error", f"project: dataset {dataset.id} is in project "
                           f"'{dataset.project}', not '{project}'")
        if dataset.status != DatasetStatus.ready:
            raise ApiError(409, "dataset_not_ready", f"dataset {dataset.id} is {dataset.status}; wait until it is "
                           "ready")
        project = dataset.project
    else:
        raise ApiError(422, "source_required", "send an archive of images in the multipart field 'file', or JSON "
                       '{"dataset_id": "..."} to predict a ready dataset\'s images')
    model = _model(session=session, principal=principal, project=project, model_id=model_id)
    batch = BatchPrediction(id=new_id(), project=project, owner=principal.id, status=BatchStatus.queued.value,
                            source="dataset" if dataset_id else "archive", dataset_id=dataset_id, model_id=model.id,
                            top_k=min(top_k, len(model.classes)), size_bytes=0, done=0, rejected=0, attempts=0)
    folder = batch_dir(settings, batch.id)
    if upload is not None:
        batch.filename, batch.size_bytes = upload.filename[:255], upload.size
        folder.mkdir(parents=True, exist_ok=True)
        os.replace(upload.path, folder / "upload")
    session.add(batch)
    try:
        session.commit()
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # no row points at it: it would never be removed
        raise
    dispatch(session=session, table=BatchPrediction, row_id=batch.id, enqueue=enqueue_batch)
    return batch


def _check_archive(*, session: Session, settings: Settings, project: str, upload: SavedFile) -> None:
    if archive_format(upload.path) is None:
        raise ApiError(415, "not_an_archive", f"'{upload.filename[:100]}' is not a .zip, .tar or .tar.gz archive; "
                       "zip the images and upload that")
    remaining = remaining_bytes(session=session, settings=settings, project=project)
    if remaining is not None and upload.size > remaining:
        raise ApiError(413, "quota_exceeded", f"project '{project}' has {remaining // 2**20} MiB left of its "
                       "quota; delete datasets, jobs, models or batch predictions there, or ask an admin to raise "
                       "quota_mb")


def get(*, session: Session, batch_id: str, principal: Principal) -> BatchPrediction:
    return get_or_404(session, BatchPrediction, "batch_prediction", batch_id, principal=principal)


def list_(*, session: Session, principal: Principal, project: str | None, status: str | None, limit: int,
          offset: int) -> tuple[list[BatchPrediction], int]:
    query = scoped(select(BatchPrediction), BatchPrediction.project, session=session, principal=principal,
                   project=project)
    if status:
        query = query.where(BatchPrediction.status == status)
    count = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(BatchPrediction.created_at.desc(), BatchPrediction.id)
                           .limit(limit).offset(offset)).all()
    return list(rows), count


def cancel(*, session: Session, settings: Settings, batch_id: str, principal: Principal) -> BatchPrediction:
    batch = get(session=session, batch_id=batch_id, principal=principal)
    for _ in range(3):  # the batch may move between our read and our guarded update
        current = BatchStatus(batch.status)
        if current in FINAL:
            raise ApiError(409, "batch_finished", f"batch prediction {batch_id} is already {current}; it cannot be "
                           "cancelled")
        if current == BatchStatus.cancelling:
            return batch
        # A running batch is stopped by its worker between chunks; a queued one never started.
        target = BatchStatus.cancelled if current == BatchStatus.queued else BatchStatus.cancelling
        if transition(session=session, batch_id=batch_id, expected=current, to=target):
            session.commit()
            if target == BatchStatus.cancelled:
                shutil.rmtree(batch_dir(settings, batch_id), ignore_errors=True)
            break
        session.rollback()
        session.refresh(batch)
    session.refresh(batch)
    return batch


def results(*, session: Session, settings: Settings, batch_id: str, principal: Principal, fmt: str) -> Path:
    batch = get(session=session, batch_id=batch_id, principal=principal)
    if batch.status != BatchStatus.succeeded:
        raise ApiError(409, "batch_not_finished", f"batch prediction {batch_id} is {batch.status}; results exist "
                       "once it has succeeded" + (f" ({batch.error})" if batch.error else ""))
    path = batch_dir(settings, batch_id) / f"results.{fmt}"
    if not path.is_file():
        raise ApiError(404, "results_missing", f"the results of batch prediction {batch_id} are no longer on disk")
    return path


def delete(*, session: Session, settings: Settings, batch_id: str, principal: Principal) -> None:
    batch = get(session=session, batch_id=batch_id, principal=principal)
    if BatchStatus(batch.status) not in FINAL:
        raise ApiError(409, "batch_active", f"batch prediction {batch_id} is {batch.status}; cancel it and wait "
                       "until it is cancelled")
    session.delete(batch)
    session.commit()
    shutil.rmtree(batch_dir(settings, batch_id), ignore_errors=True)
