from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from api.deps import ApiKeyDep, SessionDep, SettingsDep
from api.errors import ApiError
from api.predictor import Predictor, decode_upload
from api.schemas import Prediction, PredictResponse, Score
from api.services import models
from api.uploads import receive_form

router = APIRouter(tags=["predict"])

MAX_FILES = 256


def get_predictor(request: Request) -> Predictor:
    return request.app.state.predictor


PredictorDep = Annotated[Predictor, Depends(get_predictor)]


def _top_k(raw: str | None) -> int:
    if raw is None or raw == "":
        return 5
    try:
        value = int(raw)
    except ValueError as exc:
        raise ApiError(422, "validation_error", f"top_k: must be a whole number, got '{raw[:20]}'") from exc
    if value < 1:
        raise ApiError(422, "validation_error", f"top_k: must be at least 1, got {value}")
    return value


PREDICT_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "top_k": {"type": "integer", "minimum": 1}, "model_id": {"type": "string"}}}}}}}


@router.post("/v1/predict", response_model=PredictResponse, openapi_extra=PREDICT_BODY)
@router.post("/predict", response_model=PredictResponse, include_in_schema=False)
async def predict(request: Request, session: SessionDep, settings: SettingsDep, predictor: PredictorDep,
                  _: ApiKeyDep) -> PredictResponse:
    form = await receive_form(request, spool_dir=settings.data_dir / "tmp",
                              limit_bytes=settings.max_image_mb * 2**20)
    try:
        files = [f for f in form.files if f.field in ("file", "files")]
        if not files:
            raise ApiError(422, "file_required", "send one or more images in the multipart field 'file'")
        if len(files) > MAX_FILES:
            raise ApiError(413, "too_many_files", f"send at most {MAX_FILES} images per request")
        top_k = _top_k(form.fields.get("top_k", request.query_params.get("top_k")))
        wanted = form.fields.get("model_id") or request.query_params.get("model_id")
        images = [decode_upload(f.path.read_bytes(), f.filename or f"file{i}", settings.max_image_pixels)
                  for i, f in enumerate(files)]
    finally:
        form.cleanup()
    if wanted:
        models.get(session=session, model_id=wanted)
        loaded = await run_in_threadpool(predictor.get, wanted)
    else:
        serving = await run_in_threadpool(models.serving_id, session=session)
        if serving is None:
            raise ApiError(503, "no_model", "no model has been trained yet; POST /v1/jobs and wait for it to succeed")
        loaded = await run_in_threadpool(predictor.serving, serving)
    probs = await run_in_threadpool(loaded.infer, images)
    k = min(top_k, len(loaded.classes))
    scores, indices = probs.topk(k, dim=1)
    return PredictResponse(model_id=loaded.model_id, predictions=[
        Prediction(filename=f.filename, top=[Score(label=loaded.classes[i], score=float(s))
                                             for s, i in zip(row_s.tolist(), row_i.tolist(), strict=True)])
        for f, row_s, row_i in zip(files, scores, indices, strict=True)
    ])
