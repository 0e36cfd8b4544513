import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.auth import Principal, PrincipalDep
from api.deps import SessionDep, SettingsDep
from api.errors import ApiError
from api.images import prepare_images
from api.predictor import LoadedModel, Predictor, PredictorDep
from api.schemas import PredictForm, Prediction, PredictResponse, Score
from api.services import models, project_or_404
from api.uploads import receive_form
from shared.config import Settings
from shared.orm import DEFAULT_PROJECT

router = APIRouter(tags=["predict"])

MAX_FILES = 256


def label_for(top: Score, *, min_score: float, class_min_scores: dict[str, float]) -> str | None:
    """The top label, or None (abstain) when its calibrated score is under its class's threshold or the global one."""
    return None if top.score < max(min_score, class_min_scores.get(top.label, 0.0)) else top.label


def _model_for(*, predictor: Predictor, session: Session, principal: Principal, project: str | None,
               wanted: str | None) -> LoadedModel:
    """``wanted`` if given (in ``project`` when one is named), else what the project serves."""
    if wanted:
        model = models.get(session=session, model_id=wanted, principal=principal)
        if project is not None and model.project != project:
            raise ApiError(404, "model_not_found", f"project '{project}' has no model {wanted}")
        return predictor.get(wanted)
    name = project or DEFAULT_PROJECT
    project_or_404(session, name, principal=principal)
    serving = predictor.serving_id(name, lambda: models.serving_id(session=session, project=name))
    if serving is None:
        raise ApiError(503, "no_model", f"project '{name}' has no trained model yet; POST /v1/jobs and wait for "
                       "it to succeed")
    return predictor.serving(name, serving)


def _prepare(*, predictor: Predictor, session: Session, principal: Principal, project: str | None,
             wanted: str | None, files: list[tuple[str, Path]], settings: Settings
             ) -> tuple[LoadedModel, tuple[float, dict[str, float]], Any]:
    """The model, its thresholds, then the images cropped as it needs them: one trip to the threadpool."""
    loaded = _model_for(predictor=predictor, session=session, principal=principal, project=project, wanted=wanted)
    thresholds = models.thresholds(session=session, model_id=loaded.model_id)
    # JPEGs decode no larger than the dataset cache the model was trained from (its eval images).
    return loaded, thresholds, prepare_images(files, image_size=loaded.image_size, max_pixels=settings.max_image_pixels,
                                  max_request_pixels=settings.predict_max_request_megapixels * 10**6,
                                  draft_side=settings.cache_size)


PREDICT_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "top_k": {"type": "integer", "minimum": 1}, "model_id": {"type": "string"},
        "min_score": {"type": "number", "minimum": 0, "maximum": 1,
                      "description": "label is null when the calibrated top score is under this"},
        "project": {"type": "string", "description": "whose model serves the request (default 'default')"}}}}}}}


@router.post("/v1/predict", response_model=PredictResponse, openapi_extra=PREDICT_BODY)
@router.post("/predict", response_model=PredictResponse, include_in_schema=False)
async def predict(request: Request, session: SessionDep, settings: SettingsDep, predictor: PredictorDep,
                  principal: PrincipalDep) -> PredictResponse:
    return await _predict(request=request, session=session, settings=settings, predictor=predictor,
                          principal=principal, project=None)


@router.post("/v1/projects/{name}/predict", response_model=PredictResponse, openapi_extra=PREDICT_BODY,
             tags=["projects"])
async def predict_in_project(name: str, request: Request, session: SessionDep, settings: SettingsDep,
                             predictor: PredictorDep, principal: PrincipalDep) -> PredictResponse:
    await run_in_threadpool(project_or_404, session, name, principal=principal)  # before reading the body
    return await _predict(request=request, session=session, settings=settings, predictor=predictor,
                          principal=principal, project=name)


async def _predict(*, request: Request, session: Session, settings: Settings, predictor: Predictor,
                   principal: Principal, project: str | None) -> PredictResponse:
    with predictor.batcher.expecting() as ticket:
        try:
            form = await receive_form(request, spool_dir=settings.data_dir / "tmp",
                                      limit_bytes=settings.max_image_mb * 2**20,
                                      body_limit_bytes=settings.max_upload_mb * 2**20, max_files=MAX_FILES)
        except ApiError as exc:
            if exc.code == "payload_too_large":
                raise ApiError(413, "payload_too_large", f"each image may be at most {settings.max_image_mb} MiB "
                               f"(TUNESERVE_MAX_IMAGE_MB) and a request at most {settings.max_upload_mb} MiB "
                               "(TUNESERVE_MAX_UPLOAD_MB); send smaller or fewer files") from exc
            raise
        try:
            files = [f for f in form.files if f.field in ("file", "files")]
            if not files:
                raise ApiError(422, "file_required", "send one or more images in the multipart field 'file'")
            options = form.validated(PredictForm, {k: v for k, v in request.query_params.items()
                                                   if k in PredictForm.model_fields})
            top_k, min_score, wanted = options.top_k, options.min_score, options.model_id
            if project is None:
                project = options.project
            named = [(f.filename or f"file{i}", f.path) for i, f in enumerate(files)]
            loaded, (model_min, class_min), inputs = await run_in_threadpool(
                _prepare, predictor=predictor, session=session, principal=principal, project=project, wanted=wanted,
                files=named, settings=settings)
        finally:
            form.cleanup()
        future = ticket.submit(loaded, inputs)
    try:
        probs = await asyncio.wrap_future(future)
    except Exception as exc:
        raise ApiError(503, "inference_failed", f"inference failed ({type(exc).__name__}); retry shortly") from exc
    scores, indices = probs.topk(min(top_k, len(loaded.classes)), dim=1)
    tops = [[Score(label=loaded.classes[i], score=s) for s, i in zip(row_s, row_i, strict=True)]
            for row_s, row_i in zip(scores.tolist(), indices.tolist(), strict=True)]
    floor = max(min_score, model_min)
    return PredictResponse(model_id=loaded.model_id, predictions=[
        Prediction(filename=f.filename, label=label_for(top[0], min_score=floor, class_min_scores=class_min), top=top)
        for f, top in zip(files, tops, strict=True)
    ])
