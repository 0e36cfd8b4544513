from typing import Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.auth import PrincipalDep
from api.deps import PageDep, ProjectQuery, SessionDep, SettingsDep
from api.errors import ApiError
from api.schemas import (
    BATCH_MAX_TOP_K,
    BatchPredictionCreate,
    BatchPredictionForm,
    BatchPredictionPublic,
    BatchPredictionsPublic,
)
from api.services import batches, project_or_404
from api.uploads import receive_form, refuse_if_disk_low
from shared.jobstate import JobStatus

router = APIRouter(prefix="/v1/batch-predictions", tags=["batch predictions"])

CREATE_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "a .zip, .tar or .tar.gz of images"},
        "project": {"type": "string", "description": "whose model runs, and who holds the batch (default "
                                                     "'default')"},
        "top_k": {"type": "integer", "minimum": 1, "maximum": BATCH_MAX_TOP_K, "default": 5},
        "model_id": {"type": "string", "description": "default: the model the project serves now"}}}},
    "application/json": {"schema": BatchPredictionCreate.model_json_schema()}}}}
MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson"}


def _same_project(url: str | None, named: str | None) -> str | None:
    if url is not None and named is not None and named != url:
        raise ApiError(422, "validation_error", f"project: the URL says '{url}' but the body says '{named[:64]}'; "
                       "send one")
    return url or named


@router.post("", status_code=202, response_model=BatchPredictionPublic, openapi_extra=CREATE_BODY)
async def create_batch_prediction(request: Request, response: Response, session: SessionDep, settings: SettingsDep,
                                  principal: PrincipalDep, project: ProjectQuery = None) -> BatchPredictionPublic:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        try:  # the guard has already bounded a JSON body's size
            body = BatchPredictionCreate.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from exc
        batch = await run_in_threadpool(
            batches.create, session=session, settings=settings, principal=principal,
            project=_same_project(project, body.project), top_k=body.top_k, model_id=body.model_id,
            dataset_id=body.dataset_id, upload=None)
    elif content_type == "multipart/form-data":
        if project is not None:  # known before the body: a foreign project never gets to upload
            await run_in_threadpool(project_or_404, session, project, principal=principal)
        refuse_if_disk_low(request, data_dir=settings.data_dir, reserve_gb=settings.min_free_disk_gb)
        form = await receive_form(request, spool_dir=settings.data_dir / "tmp",
                                  limit_bytes=settings.max_upload_mb * 2**20)
        try:
            uploads = [f for f in form.files if f.field == "file"]
            fields = form.validated(BatchPredictionForm)
            batch = await run_in_threadpool(
                batches.create, session=session, settings=settings, principal=principal,
                project=_same_project(project, fields.project), top_k=fields.top_k, model_id=fields.model_id,
                dataset_id=fields.dataset_id, upload=uploads[0] if uploads else None)
        finally:
            form.cleanup()
    else:
        raise ApiError(415, "unsupported_media_type", "send an archive as multipart/form-data (field 'file') or "
                       'JSON {"dataset_id": "..."}')
    response.headers["Location"] = f"/v1/batch-predictions/{batch.id}"
    return BatchPredictionPublic.model_validate(batch)


@router.get("", response_model=BatchPredictionsPublic)
def list_batch_predictions(session: SessionDep, principal: PrincipalDep, page: PageDep, project: ProjectQuery = None,
                           status: JobStatus | None = None) -> BatchPredictionsPublic:
    rows, count = batches.list_(session=session, principal=principal, project=project, status=status,
                                limit=page.limit, offset=page.offset)
    return BatchPredictionsPublic(data=[BatchPredictionPublic.model_validate(r) for r in rows], count=count)


@router.get("/{batch_id}", response_model=BatchPredictionPublic)
def get_batch_prediction(batch_id: str, session: SessionDep, principal: PrincipalDep) -> BatchPredictionPublic:
    return BatchPredictionPublic.model_validate(batches.get(session=session, batch_id=batch_id, principal=principal))


@router.get("/{batch_id}/results", response_class=FileResponse,
            responses={200: {"content": {"text/csv": {}, "application/x-ndjson": {}},
                             "description": "one row per file of the archive: its top-k, or why it was rejected"}})
def get_batch_prediction_results(batch_id: str, session: SessionDep, settings: SettingsDep, principal: PrincipalDep,
                                 format: Literal["csv", "jsonl"] = Query("jsonl")) -> FileResponse:
    path = batches.results(session=session, settings=settings, batch_id=batch_id, principal=principal, fmt=format)
    return FileResponse(path, media_type=MEDIA_TYPES[format], filename=f"batch-{batch_id}.{format}")


@router.post("/{batch_id}/cancel", status_code=202, response_model=BatchPredictionPublic)
def cancel_batch_prediction(batch_id: str, session: SessionDep, settings: SettingsDep,
                            principal: PrincipalDep) -> BatchPredictionPublic:
    batch = batches.cancel(session=session, settings=settings, batch_id=batch_id, principal=principal)
    return BatchPredictionPublic.model_validate(batch)


@router.delete("/{batch_id}", status_code=204)
def delete_batch_prediction(batch_id: str, session: SessionDep, settings: SettingsDep,
                            principal: PrincipalDep) -> Response:
    batches.delete(session=session, settings=settings, batch_id=batch_id, principal=principal)
    return Response(status_code=204)
