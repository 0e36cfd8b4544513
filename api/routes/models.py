from fastapi import APIRouter, Response
from fastapi.responses import FileResponse

from api.auth import PrincipalDep
from api.deps import PageDep, ProjectQuery, SessionDep, SettingsDep
from api.predictor import PredictorDep
from api.schemas import ModelPublic, ModelsPublic, ModelUpdate
from api.services import artifacts, models, project_or_404
from api.services.artifacts import ArtifactFormat
from shared.orm import DEFAULT_PROJECT

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelsPublic)
def list_models(session: SessionDep, principal: PrincipalDep, page: PageDep, project: ProjectQuery = None
                ) -> ModelsPublic:
    rows, count = models.list_(session=session, principal=principal, project=project, limit=page.limit,
                               offset=page.offset)
    serving = models.serving_ids(session=session, models=rows)
    return ModelsPublic(data=[ModelPublic.from_row(r, serving) for r in rows], count=count)


@router.get("/{model_id}", response_model=ModelPublic)
def get_model(model_id: str, session: SessionDep, principal: PrincipalDep) -> ModelPublic:
    model = models.get(session=session, model_id=model_id, principal=principal)
    return ModelPublic.from_row(model, models.serving_ids(session=session, models=[model]))


@router.patch("/{model_id}", response_model=ModelPublic)
def update_model(model_id: str, body: ModelUpdate, session: SessionDep, principal: PrincipalDep) -> ModelPublic:
    """Set the abstain threshold (``min_score``, and per-class ``class_min_scores``) used by /predict."""
    model = models.set_thresholds(session=session, model_id=model_id, body=body, principal=principal)
    return ModelPublic.from_row(model, models.serving_ids(session=session, models=[model]))


@router.post("/{model_id}/promote", response_model=ModelPublic)
def promote_model(model_id: str, session: SessionDep, predictor: PredictorDep, principal: PrincipalDep
                  ) -> ModelPublic:
    model = models.promote(session=session, model_id=model_id, principal=principal)
    predictor.forget_serving_id(model.project)
    return ModelPublic.from_row(model, {model.id})


@router.delete("/pin", status_code=204, deprecated=True,
               description="Unpins project `default` (or `?project=`); prefer DELETE /v1/projects/{name}/pin.")
def unpin_model(session: SessionDep, predictor: PredictorDep, principal: PrincipalDep,
                project: ProjectQuery = None) -> Response:
    name = project_or_404(session, project or DEFAULT_PROJECT, principal=principal).name
    models.unpin(session=session, project=name)
    predictor.forget_serving_id(name)
    return Response(status_code=204)


@router.delete("/{model_id}", status_code=204)
def delete_model(model_id: str, session: SessionDep, settings: SettingsDep, predictor: PredictorDep,
                 principal: PrincipalDep, force: bool = False) -> Response:
    model = models.delete(session=session, settings=settings, model_id=model_id, principal=principal, force=force)
    predictor.evict(model_id)
    predictor.forget_serving_id(model.project)
    return Response(status_code=204)


@router.get("/{model_id}/artifact", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}}})
def model_artifact(model_id: str, session: SessionDep, settings: SettingsDep, principal: PrincipalDep,
                   format: ArtifactFormat = ArtifactFormat.safetensors) -> FileResponse:
    models.get(session=session, model_id=model_id, principal=principal)
    path = artifacts.artifact_path(settings=settings, model_id=model_id, fmt=format)
    return FileResponse(path, media_type="application/octet-stream", filename=f"{model_id}.{path.suffix.lstrip('.')}")
