"""Open Inference Protocol (KServe v2 / Triton REST): model name = project, version = one of its model ids.

Same keys, project scope, batching and limits as /v1/predict; request parsing lives in ``api.services.oip``.
"""

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.auth import Principal, PrincipalDep
from api.deps import SessionDep, SettingsDep
from api.errors import ApiError
from api.images import prepare_images
from api.predictor import LoadedModel, Predictor, PredictorDep
from api.routes.health import _check_db
from api.routes.predict import MAX_FILES, _model_for
from api.services import oip, project_or_404
from shared.config import Settings
from shared.orm import Model

router = APIRouter(prefix="/v2", tags=["inference (v2)"])


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, str | int | float | bool]


class ModelReady(BaseModel):
    name: str
    version: str
    ready: bool


@router.get("/health/live", response_model=Live, tags=["health"])
async def v2_live() -> Live:
    return Live(live=True)


@router.get("/health/ready", response_model=Ready, tags=["health"], responses={503: {"model": Ready}})
def v2_ready(response: Response) -> Ready:
    ready = _check_db() == "ok"
    response.status_code = 200 if ready else 503
    return Ready(ready=ready)


@router.get("", response_model=ServerMetadata)
def v2_server_metadata(request: Request) -> ServerMetadata:
    return ServerMetadata(name="tuneserve", version=request.app.version,
                          extensions=["classification", "binary_tensor_data"])


def _model_row(*, session: Session, principal: Principal, name: str, version: str | None) -> Model:
    found = session.get(Model, oip.model_id(session=session, principal=principal, name=name, version=version))
    if found is None:  # deleted between the two reads
        raise ApiError(404, "model_not_found", f"project '{name}' has no model {version}")
    return found


def _metadata(row: Model, mean_std: dict[str, str]) -> ModelMetadata:
    size = row.image_size
    return ModelMetadata(
        name=row.project, versions=[row.id], platform="pytorch_torchvision",
        inputs=[TensorMetadata(name=oip.INPUT_NAME, datatype="BYTES", shape=[-1])],
        outputs=[TensorMetadata(name=oip.OUTPUT_NAME, datatype="FP32", shape=[-1, len(row.classes)])],
        parameters={"datatypes": ",".join(oip.DATATYPES), "image_size": size,
                    "tensor_shapes": f"[N,3,{size},{size}] or [N,{size},{size},3]",
                    "bytes": "encoded images (JPEG, PNG, WEBP, BMP, GIF, TIFF); base64 text in JSON data",
                    "uint8": "RGB pixels of the centre crop at image_size",
                    "fp32": "the crop normalised: (pixel / 255 - mean) / std", **mean_std,
                    "labels": ",".join(row.classes)})


def _model_metadata(*, session: Session, principal: Principal, settings: Settings, name: str,
                    version: str | None) -> ModelMetadata:
    row = _model_row(session=session, principal=principal, name=name, version=version)
    return _metadata(row, oip.preprocessing(settings=settings, model_id=row.id))


@router.get("/models/{name}", response_model=ModelMetadata)
def v2_model_metadata(name: str, session: SessionDep, settings: SettingsDep, principal: PrincipalDep
                      ) -> ModelMetadata:
    return _model_metadata(session=session, principal=principal, settings=settings, name=name, version=None)


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata)
def v2_model_version_metadata(name: str, version: str, session: SessionDep, settings: SettingsDep,
                              principal: PrincipalDep) -> ModelMetadata:
    return _model_metadata(session=session, principal=principal, settings=settings, name=name, version=version)


def _model_ready(*, session: Session, principal: Principal, settings: Settings, name: str,
                 version: str | None) -> ModelReady:
    row = _model_row(session=session, principal=principal, name=name, version=version)
    oip.preprocessing(settings=settings, model_id=row.id)  # 503 when its files are gone
    return ModelReady(name=row.project, version=row.id, ready=True)


@router.get("/models/{name}/ready", response_model=ModelReady)
def v2_model_ready(name: str, session: SessionDep, settings: SettingsDep, principal: PrincipalDep) -> ModelReady:
    return _model_ready(session=session, principal=principal, settings=settings, name=name, version=None)


@router.get("/models/{name}/versions/{version}/ready", response_model=ModelReady)
def v2_model_version_ready(name: str, version: str, session: SessionDep, settings: SettingsDep,
                           principal: PrincipalDep) -> ModelReady:
    return _model_ready(session=session, principal=principal, settings=settings, name=name, version=version)


INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"}, "inputs": {"type": "array", "items": {"type": "object"}},
        "outputs": {"type": "array", "items": {"type": "object"}}, "parameters": {"type": "object"}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                            "description": "JSON header (Inference-Header-Content-Length bytes), "
                                                           "then binary tensor data"}}}}}
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {}, "application/octet-stream": {}}}}


def _prepare(*, predictor: Predictor, session: Session, principal: Principal, settings: Settings, name: str,
             version: str | None, body: bytes, header_length: str | None
             ) -> tuple[oip.InferRequest, LoadedModel, Any]:
    """Parse (every claim checked), then the model, then its input batch: one trip to the threadpool."""
    parsed = oip.parse_request(body, header_length=header_length, max_images=MAX_FILES,
                               max_image_bytes=settings.max_image_mb * 2**20)
    loaded = _model_for(predictor=predictor, session=session, principal=principal, project=name, wanted=version)
    max_pixels = settings.predict_max_request_megapixels * 10**6
    if parsed.datatype != "BYTES":
        return parsed, loaded, oip.tensor_batch(parsed, image_size=loaded.image_size, mean=loaded.meta["mean"],
                                                std=loaded.meta["std"], max_request_pixels=max_pixels)
    files = oip.spool_images(parsed.images, settings.data_dir / "tmp")
    try:
        return parsed, loaded, prepare_images(files, image_size=loaded.image_size,
                                              max_pixels=settings.max_image_pixels, max_request_pixels=max_pixels,
                                              draft_side=settings.cache_size)
    finally:
        oip.remove(files)


async def _infer(*, request: Request, session: Session, settings: Settings, predictor: Predictor,
                 principal: Principal, name: str, version: str | None) -> Response:
    await run_in_threadpool(project_or_404, session, name, principal=principal)  # before reading the body
    with predictor.batcher.expecting() as ticket:
        body = await request.body()  # at most TUNESERVE_MAX_IMAGE_MB: api.guard caps it while it arrives
        parsed, loaded, inputs = await run_in_threadpool(
            _prepare, predictor=predictor, session=session, principal=principal, settings=settings, name=name,
            version=version, body=body, header_length=request.headers.get("inference-header-content-length"))
        future = ticket.submit(loaded, inputs)
    try:
        probs = await asyncio.wrap_future(future)
    except Exception as exc:
        raise ApiError(503, "inference_failed", f"inference failed ({type(exc).__name__}); retry shortly") from exc
    content, header_length = oip.response(request=parsed, probs=probs, classes=loaded.classes, model_name=name,
                                          model_version=loaded.model_id)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(header_length)})


@router.post("/models/{name}/infer", response_class=Response, openapi_extra=INFER_BODY, responses=INFER_RESPONSES)
async def v2_infer(name: str, request: Request, session: SessionDep, settings: SettingsDep, predictor: PredictorDep,
                   principal: PrincipalDep) -> Response:
    return await _infer(request=request, session=session, settings=settings, predictor=predictor,
                        principal=principal, name=name, version=None)


@router.post("/models/{name}/versions/{version}/infer", response_class=Response, openapi_extra=INFER_BODY,
             responses=INFER_RESPONSES)
async def v2_infer_version(name: str, version: str, request: Request, session: SessionDep, settings: SettingsDep,
                           predictor: PredictorDep, principal: PrincipalDep) -> Response:
    return await _infer(request=request, session=session, settings=settings, predictor=predictor,
                        principal=principal, name=name, version=version)
