from fastapi import APIRouter, Query, Response
from fastapi.responses import FileResponse

from api.deps import ApiKeyDep, SessionDep, SettingsDep
from api.predictor import PredictorDep
from api.schemas import ModelPublic, ModelsPublic
from api.services import artifacts, models
from api.services.artifacts import ArtifactFormat
from shared.orm import Model

router = APIRouter(prefix="/v1/models", tags=["models"])


def to_public(model: Model, serving: str | None) -> ModelPublic:
    public = ModelPublic.model_validate(model)
    public.serving = model.id == serving
    return public


@router.get("", response_model=ModelsPublic)
def list_models(session: SessionDep, _: ApiKeyDep, limit: int = Query(50, ge=1, le=500),
                offset: int = Query(0, ge=0, le=2**31 - 1)) -> ModelsPublic:
    rows, count = models.list_(session=session, limit=limit, offset=offset)
    serving = models.serving_id(session=session)
    return ModelsPublic(data=[to_public(r, serving) for r in rows], count=count)


@router.get("/{model_id}", response_model=ModelPublic)
def get_model(model_id: str, session: SessionDep, _: ApiKeyDep) -> ModelPublic:
    return to_public(models.get(session=session, model_id=model_id), models.serving_id(session=session))


@router.post("/{model_id}/promote", response_model=ModelPublic)
def promote_model(model_id: str, session: SessionDep, predictor: PredictorDep, _: ApiKeyDep) -> ModelPublic:
    model = models.promote(session=session, model_id=model_id)
    predictor.forget_serving_id()
    return to_public(model, model.id)


@router.delete("/pin", status_code=204)
def unpin_model(session: SessionDep, predictor: PredictorDep, _: ApiKeyDep) -> Response:
    models.unpin(session=session)
    predictor.forget_serving_id()
    return Response(status_code=204)


@router.delete("/{model_id}", status_code=204)
def delete_model(model_id: str, session: SessionDep, settings: SettingsDep, predictor: PredictorDep,
                 _: ApiKeyDep) -> Response:
    models.delete(session=session, settings=settings, model_id=model_id)
    predictor.evict(model_id)
    predictor.forget_serving_id()
    return Response(status_code=204)


@router.get("/{model_id}/artifact", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}}})
def model_artifact(model_id: str, session: SessionDep, settings: SettingsDep, _: ApiKeyDep,
                   format: ArtifactFormat = ArtifactFormat.safetensors) -> FileResponse:
    models.get(session=session, model_id=model_id)
    path = artifacts.artifact_path(settings=settings, model_id=model_id, fmt=format)
    return FileResponse(path, media_type="application/octet-stream", filename=f"{model_id}.{path.suffix.lstrip('.')}")
