from fastapi import APIRouter, Query, Request, Response

from api.deps import ApiKeyDep, SessionDep, SettingsDep
from api.errors import ApiError
from api.schemas import DatasetPublic, DatasetsPublic
from api.services import datasets
from api.uploads import receive_form

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post("", status_code=202, response_model=DatasetPublic,
             openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                 "type": "object", "required": ["file"], "properties": {
                     "file": {"type": "string", "format": "binary"}, "name": {"type": "string"}}}}}}})
async def create_dataset(request: Request, session: SessionDep, settings: SettingsDep, _: ApiKeyDep
                         ) -> DatasetPublic:
    form = await receive_form(request, spool_dir=settings.data_dir / "tmp",
                              limit_bytes=settings.max_upload_mb * 2**20)
    try:
        uploads = [f for f in form.files if f.field == "file"]
        if len(uploads) != 1:
            raise ApiError(422, "file_required", "send exactly one archive in the multipart field 'file'")
        dataset = datasets.create(session=session, settings=settings, upload=uploads[0],
                                  name=form.fields.get("name"))
    finally:
        form.cleanup()
    return DatasetPublic.model_validate(dataset)


@router.get("", response_model=DatasetsPublic)
def list_datasets(session: SessionDep, _: ApiKeyDep, status: str | None = None,
                  limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=2**31 - 1)) -> DatasetsPublic:
    rows, count = datasets.list_(session=session, status=status, limit=limit, offset=offset)
    return DatasetsPublic(data=[DatasetPublic.model_validate(r) for r in rows], count=count)


@router.get("/{dataset_id}", response_model=DatasetPublic)
def get_dataset(dataset_id: str, session: SessionDep, _: ApiKeyDep) -> DatasetPublic:
    return DatasetPublic.model_validate(datasets.get(session=session, dataset_id=dataset_id))


@router.delete("/{dataset_id}", status_code=204)
def delete_dataset(dataset_id: str, session: SessionDep, settings: SettingsDep, _: ApiKeyDep) -> Response:
    datasets.delete(session=session, settings=settings, dataset_id=dataset_id)
    return Response(status_code=204)
