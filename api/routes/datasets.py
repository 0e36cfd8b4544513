from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from api.auth import PrincipalDep
from api.deps import PageDep, ProjectQuery, SessionDep, SettingsDep
from api.errors import ApiError
from api.schemas import DatasetForm, DatasetPublic, DatasetsPublic
from api.services import datasets, project_or_404
from api.uploads import receive_form, refuse_if_disk_low
from shared.jobstate import DatasetStatus
from shared.orm import DEFAULT_PROJECT
from shared.quota import remaining_bytes

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}, "name": {"type": "string"},
        "project": {"type": "string", "description": "the project to hold it (default 'default'); "
                                                     "?project= in the URL lets a quota refuse it sooner"}}}}}}}


def quota_exceeded(project: str, remaining: int) -> ApiError:
    return ApiError(413, "quota_exceeded", f"project '{project}' has {remaining // 2**20} MiB left of its quota; "
                    "delete datasets, jobs or models there, or ask an admin to raise quota_mb")


@router.post("", status_code=202, response_model=DatasetPublic, openapi_extra=UPLOAD_BODY)
async def create_dataset(request: Request, session: SessionDep, settings: SettingsDep, principal: PrincipalDep,
                         project: ProjectQuery = None) -> DatasetPublic:
    limit = settings.max_upload_mb * 2**20
    refuse_if_disk_low(request, data_dir=settings.data_dir, reserve_gb=settings.min_free_disk_gb)
    remaining = None
    if project is not None:  # known before the body: the quota can stop the upload while it streams
        await run_in_threadpool(project_or_404, session, project, principal=principal)
        remaining = await run_in_threadpool(remaining_bytes, session=session, settings=settings, project=project)
    try:
        form = await receive_form(request, spool_dir=settings.data_dir / "tmp",
                                  limit_bytes=limit if remaining is None else min(limit, remaining))
    except ApiError as exc:
        if exc.code == "payload_too_large" and remaining is not None and remaining < limit:
            raise quota_exceeded(project or "", remaining) from exc
        raise
    try:
        uploads = [f for f in form.files if f.field == "file"]
        if len(uploads) != 1:
            raise ApiError(422, "file_required", "send exactly one archive in the multipart field 'file'")
        fields = form.validated(DatasetForm)
        named = fields.project
        if project is not None and named is not None and named != project:
            raise ApiError(422, "validation_error", f"project: the URL says '{project}' but the form says "
                           f"'{named[:64]}'; send one")
        if project is None:
            project = named or DEFAULT_PROJECT
            await run_in_threadpool(project_or_404, session, project, principal=principal)
            remaining = await run_in_threadpool(remaining_bytes, session=session, settings=settings, project=project)
            if remaining is not None and uploads[0].size > remaining:
                raise quota_exceeded(project, remaining)
        dataset = await run_in_threadpool(datasets.create, session=session, settings=settings, upload=uploads[0],
                                          name=fields.name, project=project)
    finally:
        form.cleanup()
    return DatasetPublic.model_validate(dataset)


@router.get("", response_model=DatasetsPublic)
def list_datasets(session: SessionDep, principal: PrincipalDep, page: PageDep, project: ProjectQuery = None,
                  status: DatasetStatus | None = None) -> DatasetsPublic:
    rows, count = datasets.list_(session=session, principal=principal, project=project, status=status,
                                 limit=page.limit, offset=page.offset)
    return DatasetsPublic(data=[DatasetPublic.model_validate(r) for r in rows], count=count)


@router.get("/{dataset_id}", response_model=DatasetPublic)
def get_dataset(dataset_id: str, session: SessionDep, principal: PrincipalDep) -> DatasetPublic:
    return DatasetPublic.model_validate(datasets.get(session=session, dataset_id=dataset_id, principal=principal))


@router.delete("/{dataset_id}", status_code=204)
def delete_dataset(dataset_id: str, session: SessionDep, settings: SettingsDep, principal: PrincipalDep) -> Response:
    datasets.delete(session=session, settings=settings, dataset_id=dataset_id, principal=principal)
    return Response(status_code=204)
