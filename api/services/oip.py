"""Open Inference Protocol (KServe v2 / Triton REST) requests and responses, as plain functions.

A request is a JSON header, optionally followed by binary tensor data (Triton's binary tensor data extension:
``Inference-Header-Content-Length`` says where the JSON ends, each input's ``binary_data_size`` how many of the
following bytes are its own). Every size a client claims is checked against the bytes it actually sent and
the service's limits before anything is allocated from it.

Inputs (one, named ``IMAGE``):
- ``BYTES`` [N] or [N,1]: encoded images (JPEG, PNG...), decoded and cropped exactly as ``/v1/predict`` does;
  in JSON ``data`` each element is base64 text (raw image bytes are not valid JSON strings).
- ``UINT8`` [N,3,S,S] or [N,S,S,3]: RGB pixels of the eval crop at the model's size S.
- ``FP32`` in the same shapes: the crop already normalised, ``(pixel / 255 - mean) / std`` with the mean and
  std in the model metadata: the very tensor the network takes, as torchvision's eval transforms produce it.
"""

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from api.auth import Principal
from api.errors import ApiError
from api.services import models, project_or_404
from shared.config import Settings
from shared.storage import model_dir, read_json

INPUT_NAME = "IMAGE"
OUTPUT_NAME = "PROBABILITIES"
DATATYPES = ("BYTES", "UINT8", "FP32")
ITEM_BYTES = {"UINT8": 1, "FP32": 4}
# Parsed JSON numbers cost about 30 bytes each: 4 MiB of JSON is at most ~2M numbers (~64 MB) while it is
# turned into a tensor. Larger tensors go as binary data, which is used in place.
MAX_HEADER_BYTES = 4 * 2**20
# Integers shapes may use; anything larger is a claim no request can back with bytes.
MAX_DIM = 2**31


def bad(detail: str, code: str = "invalid_inference_request") -> ApiError:
    return ApiError(int(HTTPStatus.BAD_REQUEST), code, detail)


def model_id(*, session: Session, principal: Principal, name: str, version: str | None) -> str:
    """The model a /v2/models/{name}[/versions/{version}] path means: ``version`` must be one of project
    ``name``'s models (404 otherwise); without one, what the project serves."""
    project_or_404(session, name, principal=principal)
    if version is not None:
        model = models.get(session=session, model_id=version, principal=principal)
        if model.project != name:
            raise ApiError(404, "model_not_found", f"project '{name}' has no model {version}")
        return model.id
    serving = models.serving_id(session=session, project=name)
    if serving is None:
        raise ApiError(503, "no_model", f"project '{name}' has no trained model yet; POST /v1/jobs and wait for "
                       "it to succeed")
    return serving


def preprocessing(*, settings: Settings, model_id: str) -> dict[str, str]:
    """The mean and std an FP32 input is normalised with, from the artifact's model.json (read directly:
    shared.modeling would import torch); 503 when the artifact is gone."""
    try:
        meta = read_json(model_dir(settings, model_id) / "model.json")
    except FileNotFoundError:
        raise ApiError(503, "model_unavailable", f"model {model_id}'s files are missing") from None
    return {"mean": ",".join(f"{v:g}" for v in meta["mean"]), "std": ",".join(f"{v:g}" for v in meta["std"])}


@dataclass
class Output:
    binary: bool
    classification: int = 0  # k > 0: Triton's classification extension, "score:index:label" strings


@dataclass
class InferRequest:
    id: str | None
    datatype: str
    shape: list[int]
    images: list[bytes] = field(default_factory=list)  # BYTES
    tensor: np.ndarray | None = None  # UINT8 / FP32, as sent (NCHW or NHWC)
    outputs: list[Output] = field(default_factory=list)


def _split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        json_part, binary = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise bad(f"Inference-Header-Content-Length is '{header_length[:20]}' but the body has {len(body)} "
                      "bytes; it must be the length of the JSON header that starts the body")
        json_part, binary = body[:int(header_length)], body[int(header_length):]
    if len(json_part) > MAX_HEADER_BYTES:
        raise bad(f"the JSON part is {len(json_part)} bytes, over {MAX_HEADER_BYTES // 2**20} MiB; send tensor "
                  "data as binary (the binary tensor data extension)")
    try:
        header = json.loads(json_part)
    except RecursionError:
        raise bad("the request's JSON is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"the request is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise bad("the request must be a JSON object with 'inputs'")
    return header, binary


def _shape(raw: Any) -> list[int]:
    if not isinstance(raw, list) or not raw or len(raw) > 4 or \
            not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= MAX_DIM for d in raw):
        raise bad(f"shape must be a list of 1 to 4 positive integers, got {json.dumps(raw)[:80]}")
    return raw


def _bytes_elements(raw: bytes) -> list[bytes]:
    """Triton's BYTES serialisation: each element is a 4-byte little-endian length and that many bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise bad("BYTES binary data ends inside an element's 4-byte length prefix")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise bad(f"a BYTES element claims {size} bytes but only {len(raw) - offset} are left")
        elements.append(raw[offset:offset + size])
        offset += size
    return elements


def _json_images(data: list[Any]) -> list[bytes]:
    flat = [d[0] if isinstance(d, list) and len(d) == 1 else d for d in data]  # [N,1] may arrive nested
    if not all(isinstance(d, str) for d in flat):
        raise bad("BYTES data in JSON must be a list of base64 strings, one per image")
    try:
        return [base64.b64decode(d, validate=True) for d in flat]
    except binascii.Error as exc:
        raise bad(f"BYTES data in JSON must be base64 text: {exc}") from None


def _json_tensor(data: Any, datatype: str, count: int) -> np.ndarray:
    try:
        values = np.asarray(data, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise bad(f"{datatype} data must be a (flat or nested) list of numbers: {exc}") from None
    if values.size != count:
        raise bad(f"data has {values.size} elements but the shape says {count}", "shape_mismatch")
    if datatype == "UINT8":
        if not np.all((values >= 0) & (values <= 255) & (values == np.round(values))):
            raise bad("UINT8 data must be whole numbers from 0 to 255")
        return values.astype(np.uint8)
    return values.astype(np.float32)


def _input(spec: Any, binary: bytes, *, max_images: int, max_image_bytes: int) -> tuple[str, list[int], Any]:
    """The input's datatype, shape and payload (image bytes, or a flat array), every claim checked."""
    if not isinstance(spec, dict):
        raise bad("each input must be an object with name, shape, datatype and data")
    if spec.get("name") != INPUT_NAME:
        raise bad(f"unknown input '{str(spec.get('name'))[:64]}'; this model takes one input named "
                  f"'{INPUT_NAME}'", "unknown_input")
    datatype = spec.get("datatype")
    if datatype not in DATATYPES:
        raise bad(f"input datatype '{str(datatype)[:16]}' is not supported; use one of {', '.join(DATATYPES)}",
                  "unsupported_datatype")
    shape = _shape(spec.get("shape"))
    count = math.prod(shape)  # exact: Python integers do not overflow
    if shape[0] > max_images:
        raise bad(f"the shape asks for {shape[0]} images; at most {max_images} per request", "too_many_images")
    parameters = spec.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
            raise bad(f"binary_data_size is {json.dumps(size)[:20]} but {len(binary)} bytes follow the JSON header",
                      "shape_mismatch")
        if "data" in spec:
            raise bad("an input has either binary data or JSON 'data', not both")
    elif binary:
        raise bad(f"{len(binary)} bytes follow the JSON header but no input has a binary_data_size")
    elif not isinstance(spec.get("data"), list):
        raise bad("the input needs 'data' (a JSON list) or binary data (parameters.binary_data_size)")
    if datatype == "BYTES":
        if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
            raise bad(f"a BYTES input of encoded images has shape [N] or [N,1], got {shape}", "shape_mismatch")
        images = _bytes_elements(binary) if size is not None else _json_images(spec["data"])
        if len(images) != count:
            raise bad(f"the data holds {len(images)} images but the shape says {count}", "shape_mismatch")
        if too_big := [i for i, image in enumerate(images) if len(image) > max_image_bytes]:
            raise ApiError(413, "payload_too_large", f"image {too_big[0]} is over {max_image_bytes // 2**20} MiB "
                           "(TUNESERVE_MAX_IMAGE_MB)")
        return datatype, shape, images
    if len(shape) != 4:
        raise bad(f"a {datatype} input has shape [N,3,S,S] or [N,S,S,3], got {shape}", "shape_mismatch")
    if size is not None:
        if size != count * ITEM_BYTES[datatype]:
            raise bad(f"the shape {shape} of {datatype} needs {count * ITEM_BYTES[datatype]} bytes but "
                      f"{size} were sent", "shape_mismatch")
        dtype = np.uint8 if datatype == "UINT8" else np.dtype("<f4")
        return datatype, shape, np.frombuffer(binary, dtype=dtype)
    return datatype, shape, _json_tensor(spec["data"], datatype, count)


def _outputs(header: dict[str, Any]) -> list[Output]:
    parameters = header.get("parameters") or {}
    default_binary = bool(isinstance(parameters, dict) and parameters.get("binary_data_output"))
    raw = header.get("outputs")
    if raw is None:
        return [Output(binary=default_binary)]
    if not isinstance(raw, list) or not raw or len(raw) > 8:
        raise bad("outputs must be a list of 1 to 8 requested outputs")
    outputs = []
    for spec in raw:
        if not isinstance(spec, dict) or spec.get("name") != OUTPUT_NAME:
            name = spec.get("name") if isinstance(spec, dict) else spec
            raise bad(f"unknown output '{str(name)[:64]}'; this model has one output, '{OUTPUT_NAME}'",
                      "unknown_output")
        params = spec.get("parameters") or {}
        k = params.get("classification", 0) if isinstance(params, dict) else 0
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise bad(f"classification must be a whole number of classes, got {json.dumps(k)[:20]}")
        binary = params.get("binary_data", default_binary) if isinstance(params, dict) else default_binary
        outputs.append(Output(binary=bool(binary), classification=k))
    return outputs


def parse_request(body: bytes, *, header_length: str | None, max_images: int, max_image_bytes: int
                  ) -> InferRequest:
    header, binary = _split_body(body, header_length)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise bad(f"send exactly one input, '{INPUT_NAME}'")
    request_id = header.get("id")
    datatype, shape, payload = _input(inputs[0], binary, max_images=max_images, max_image_bytes=max_image_bytes)
    request = InferRequest(id=str(request_id)[:128] if request_id is not None else None, datatype=datatype,
                           shape=shape, outputs=_outputs(header))
    if datatype == "BYTES":
        request.images = payload
    else:
        request.tensor = payload
    return request


def tensor_batch(request: InferRequest, *, image_size: int, mean: list[float], std: list[float],
                 max_request_pixels: int) -> Any:
    """A UINT8/FP32 request as the predictor's NCHW batch: uint8 pixels, or float on the same 0-255 scale
    (the predictor normalises both the same way, so an FP32 input comes back exactly as it was sent)."""
    import torch

    assert request.tensor is not None
    n, *rest = request.shape
    side = image_size
    if rest == [3, side, side]:
        layout = "NCHW"
    elif rest == [side, side, 3]:
        layout = "NHWC"
    else:
        raise bad(f"this model takes {request.datatype} images of shape [N,3,{side},{side}] or "
                  f"[N,{side},{side},3], got {request.shape}", "shape_mismatch")
    if n * side * side > max_request_pixels:
        raise ApiError(413, "too_many_pixels", f"{n} images of {side}x{side} are over the "
                       f"{max_request_pixels // 10**6} megapixels allowed per request")
    batch = torch.from_numpy(request.tensor.copy()).reshape(request.shape)
    if layout == "NHWC":
        batch = batch.permute(0, 3, 1, 2)
    batch = batch.contiguous()
    if request.datatype == "UINT8":
        return batch
    if not torch.isfinite(batch).all():
        raise bad("FP32 data holds NaN or infinity")
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
    return batch * std_t + mean_t


def spool_images(images: list[bytes], spool_dir: Path) -> list[tuple[str, Path]]:
    """BYTES elements as files, so ``api.images.prepare_images`` (the /v1/predict decoder) reads them."""
    import tempfile

    spool_dir.mkdir(parents=True, exist_ok=True)
    named = []
    try:
        for i, data in enumerate(images):
            with tempfile.NamedTemporaryFile(prefix=".upload-", dir=spool_dir, delete=False) as handle:
                named.append((f"IMAGE[{i}]", Path(handle.name)))
                handle.write(data)
    except BaseException:
        remove(named)
        raise
    return named


def remove(named: list[tuple[str, Path]]) -> None:
    for _, path in named:
        path.unlink(missing_ok=True)


def _bytes_tensor(strings: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in (s.encode() for s in strings))


def response(*, request: InferRequest, probs: Any, classes: list[str], model_name: str, model_version: str
             ) -> tuple[bytes, int | None]:
    """The body, and the JSON header's length when binary outputs follow it (else None: all JSON)."""
    outputs, chunks = [], []
    n = len(classes)
    for output in request.outputs:
        if output.classification:
            k = min(output.classification, n)
            scores, indices = probs.topk(k, dim=1)
            strings = [f"{s:f}:{i}:{classes[i]}" for row_s, row_i in zip(scores.tolist(), indices.tolist(),
                                                                        strict=True)
                       for s, i in zip(row_s, row_i, strict=True)]
            entry: dict[str, Any] = {"name": OUTPUT_NAME, "datatype": "BYTES", "shape": [len(probs), k]}
            raw = _bytes_tensor(strings) if output.binary else None
            data: list[Any] = strings
        else:
            entry = {"name": OUTPUT_NAME, "datatype": "FP32", "shape": [len(probs), n]}
            array = probs.numpy().astype("<f4")
            raw = array.tobytes() if output.binary else None
            data = array.reshape(-1).tolist()
        if raw is not None:
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = data
        outputs.append(entry)
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": outputs}
    if request.id is not None:
        header["id"] = request.id
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return (encoded + b"".join(chunks), len(encoded)) if chunks else (encoded, None)
