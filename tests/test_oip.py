"""Open Inference Protocol (/v2) against a live server, spoken by the real Triton client (tritonclient.http):
health, metadata, BYTES and tensor inputs that agree with /v1/predict, the classification extension, the
binary tensor data extension, project scope, and requests whose claims do not add up (400, nothing served)."""

import base64
import json
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.live import serve
from tests.model_rows import CLASSES, publish_model
from tests.processes import Service, reset_caches
from tests.synthetic import jpeg_bytes, make_image

ADMIN = "oip-admin-key"
MAX_IMAGE_MB = 1


@dataclass
class Live:
    service: Service
    triton: triton.InferenceServerClient
    # The Triton client's infer() adds Inference-Header-Content-Length to the headers it is given: pass copies.
    alpha: dict[str, str]
    beta: dict[str, str]
    model_id: str  # alpha's serving model
    beta_model_id: str

    def post(self, path: str, headers: dict[str, str] | None = None, **kwargs) -> httpx.Response:
        return httpx.post(self.service.url + path, headers={**self.alpha, **(headers or {})}, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def live(pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    data_dir = tmp_path_factory.mktemp("oip") / "data"
    extra = {"TUNESERVE_API_KEYS": ADMIN, "TUNESERVE_MAX_IMAGE_MB": str(MAX_IMAGE_MB)}
    with serve(data_dir, pg_url, redis_url, workers=0, **extra) as service, pytest.MonkeyPatch.context() as env:
        for key, value in service.env.items():  # this process writes the model rows and files the API serves
            if key.startswith("TUNESERVE_"):
                env.setenv(key, value)
        reset_caches()
        admin = {"Authorization": f"Bearer {ADMIN}"}
        keys = {}
        with service.client(headers=admin) as client:
            for name in ("alpha", "beta"):
                assert client.post("/v1/projects", json={"name": name}).status_code == 201
                created = client.post("/v1/keys", json={"name": name, "role": "member", "projects": [name]})
                keys[name] = {"Authorization": f"Bearer {created.json()['key']}"}
        model_id = publish_model(project="alpha")
        beta_model_id = publish_model(project="beta", seed=1)
        client = triton.InferenceServerClient(url=service.url.removeprefix("http://"), network_timeout=120)
        try:
            yield Live(service, client, keys["alpha"], keys["beta"], model_id, beta_model_id)
        finally:
            client.close()
            reset_caches()


def images(count: int = 2) -> list[bytes]:
    return [jpeg_bytes(make_image(CLASSES[i % 3], random.Random(i), 40)) for i in range(count)]


def v1_scores(live: Live, data: list[bytes]) -> np.ndarray:
    """/v1's probabilities for each image, in class order (top_k = every class)."""
    answer = httpx.post(f"{live.service.url}/v1/projects/alpha/predict", headers=live.alpha, timeout=60,
                        files=[("file", (f"{i}.jpg", d, "image/jpeg")) for i, d in enumerate(data)],
                        data={"top_k": str(len(CLASSES))})
    assert answer.status_code == 200, answer.text
    return np.array([[{s["label"]: s["score"] for s in p["top"]}[c] for c in CLASSES]
                     for p in answer.json()["predictions"]])


def bytes_input(data: list[bytes], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("IMAGE", [len(data)], "BYTES")
    tensor.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)
    return tensor


def eval_crop(data: bytes) -> np.ndarray:
    """The uint8 HWC centre crop /v1/predict makes of an image (32 px, the published model's size)."""
    import io

    from shared.modeling.transforms import eval_uint8

    return eval_uint8(Image.open(io.BytesIO(data)), 32).permute(1, 2, 0).numpy()


def test_server_health_and_metadata_through_the_triton_client(live: Live):
    assert live.triton.is_server_live() and live.triton.is_server_ready()
    metadata = live.triton.get_server_metadata()
    assert metadata["name"] == "tuneserve"
    assert {"classification", "binary_tensor_data"} <= set(metadata["extensions"])


def test_model_metadata_names_its_input_output_and_preprocessing(live: Live):
    metadata = live.triton.get_model_metadata("alpha", headers={**live.alpha})
    assert (metadata["name"], metadata["versions"]) == ("alpha", [live.model_id])
    assert metadata["inputs"] == [{"name": "IMAGE", "datatype": "BYTES", "shape": [-1]}]
    assert metadata["outputs"] == [{"name": "PROBABILITIES", "datatype": "FP32", "shape": [-1, 3]}]
    assert metadata["parameters"]["image_size"] == 32
    assert metadata["parameters"]["mean"] == "0.485,0.456,0.406"
    assert metadata["parameters"]["labels"] == "blue,green,red"
    assert live.triton.is_model_ready("alpha", live.model_id, headers={**live.alpha})
    assert not live.triton.is_model_ready("alpha", live.beta_model_id, headers={**live.alpha})


def test_bytes_input_gives_the_probabilities_of_v1_predict(live: Live):
    data = images(3)
    result = live.triton.infer("alpha", [bytes_input(data)], headers={**live.alpha})

    probs = result.as_numpy("PROBABILITIES")
    assert probs.shape == (3, 3) and probs.dtype == np.float32
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert np.allclose(probs, v1_scores(live, data), atol=1e-5)
    assert result.get_response()["model_version"] == live.model_id


def test_fp32_normalised_tensor_gives_the_probabilities_of_v1_predict(live: Live):
    data = images(2)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    nchw = np.stack([((eval_crop(d) / 255 - mean) / std).transpose(2, 0, 1) for d in data]).astype(np.float32)
    tensor = triton.InferInput("IMAGE", list(nchw.shape), "FP32")
    tensor.set_data_from_numpy(nchw)

    result = live.triton.infer("alpha", [tensor], model_version=live.model_id, headers={**live.alpha})

    assert np.allclose(result.as_numpy("PROBABILITIES"), v1_scores(live, data), atol=1e-4)


def test_uint8_nhwc_tensor_as_plain_json_gives_the_probabilities_of_v1_predict(live: Live):
    data = images(2)
    nhwc = np.stack([eval_crop(d) for d in data])
    tensor = triton.InferInput("IMAGE", list(nhwc.shape), "UINT8")
    tensor.set_data_from_numpy(nhwc, binary_data=False)
    output = triton.InferRequestedOutput("PROBABILITIES", binary_data=False)

    result = live.triton.infer("alpha", [tensor], outputs=[output], headers={**live.alpha})

    assert "binary_data_size" not in json.dumps(result.get_response())
    assert np.allclose(result.as_numpy("PROBABILITIES"), v1_scores(live, data), atol=1e-5)


def test_classification_extension_answers_score_index_label_strings(live: Live):
    data = images(2)
    output = triton.InferRequestedOutput("PROBABILITIES", class_count=2)

    result = live.triton.infer("alpha", [bytes_input(data)], outputs=[output], headers={**live.alpha})

    top = result.as_numpy("PROBABILITIES")
    assert top.shape == (2, 2)
    expected = v1_scores(live, data)
    for row, scores in zip(top, expected, strict=True):
        parsed = [entry.decode().split(":") for entry in row]
        order = np.argsort(-scores)[:2]
        assert [int(index) for _, index, _ in parsed] == order.tolist()
        assert [label for _, _, label in parsed] == [CLASSES[i] for i in order]
        assert np.allclose([float(score) for score, _, _ in parsed], scores[order], atol=1e-5)


def test_json_bytes_are_base64_and_classification_can_be_plain_json(live: Live):
    data = images(1)
    body = {"id": "req-1", "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1],
                                       "data": [base64.b64encode(data[0]).decode()]}],
            "outputs": [{"name": "PROBABILITIES", "parameters": {"classification": 5}}]}

    answer = live.post("/v2/models/alpha/infer", json=body)

    assert answer.status_code == 200, answer.text
    output = answer.json()["outputs"][0]
    assert (answer.json()["id"], output["datatype"], output["shape"]) == ("req-1", "BYTES", [1, 3])  # k clamped
    assert sorted(s.split(":")[2] for s in output["data"]) == sorted(CLASSES)


def test_another_teams_key_gets_404_through_the_triton_client(live: Live):
    for call in (lambda: live.triton.get_model_metadata("alpha", headers={**live.beta}),
                 lambda: live.triton.infer("alpha", [bytes_input(images(1))], headers={**live.beta})):
        with pytest.raises(InferenceServerException) as raised:
            call()
        assert raised.value.status() == "404"
        assert "project alpha does not exist" in raised.value.message()
    assert not live.triton.is_model_ready("alpha", headers={**live.beta})


def test_a_version_of_another_project_is_404(live: Live):
    answer = live.post(f"/v2/models/alpha/versions/{live.beta_model_id}/infer",
                       json={"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}]})
    assert (answer.status_code, answer.json()["code"]) == (404, "model_not_found")


def test_a_project_without_a_model_is_503_no_model(live: Live):
    answer = httpx.get(f"{live.service.url}/v2/models/default", headers={"Authorization": f"Bearer {ADMIN}"})
    assert (answer.status_code, answer.json()["code"]) == (503, "no_model")


def binary_request(header: dict, binary: bytes, header_length: int | None = None) -> dict:
    encoded = json.dumps(header).encode()
    length = len(encoded) if header_length is None else header_length
    return {"content": encoded + binary, "headers": {"Inference-Header-Content-Length": str(length),
                                                      "Content-Type": "application/octet-stream"}}


def fp32(shape: list[int], size: int | None = None, name: str = "IMAGE", datatype: str = "FP32") -> dict:
    count = int(np.prod(shape)) * 4 if size is None else size
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape,
                        "parameters": {"binary_data_size": count}}]}


ONE_FP32 = np.zeros((1, 3, 32, 32), dtype=np.float32).tobytes()
HOSTILE = {
    "shape claims a billion images": (binary_request(fp32([10**9, 3, 32, 32], size=len(ONE_FP32)), ONE_FP32),
                                      "too_many_images"),
    "shape claims a huge image": (binary_request(fp32([1, 3, 10**5, 10**5], size=len(ONE_FP32)), ONE_FP32),
                                  "shape_mismatch"),
    "binary size is not what was sent": (binary_request(fp32([1, 3, 32, 32], size=len(ONE_FP32) + 4), ONE_FP32),
                                         "shape_mismatch"),
    "shape at the wrong size": (binary_request(fp32([4, 3, 16, 16]), ONE_FP32), "shape_mismatch"),
    "wrong datatype": (binary_request(fp32([1, 3, 32, 32], datatype="INT64"), ONE_FP32), "unsupported_datatype"),
    "unknown input name": (binary_request(fp32([1, 3, 32, 32], name="INPUT__0"), ONE_FP32), "unknown_input"),
    "header length past the body": (binary_request(fp32([1, 3, 32, 32]), ONE_FP32, header_length=10**9),
                                    "invalid_inference_request"),
    "NaN in FP32": (binary_request(fp32([1, 3, 32, 32]), np.full((1, 3, 32, 32), np.nan, np.float32).tobytes()),
                    "invalid_inference_request"),
    "BYTES element claims more than sent": (
        binary_request({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1],
                                    "parameters": {"binary_data_size": 8}}]}, b"\xff\xff\xff\x7fabcd"),
        "invalid_inference_request"),
    "JSON data shorter than the shape": (
        {"json": {"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [1, 2, 3]}]}},
        "shape_mismatch"),
    "UINT8 out of range": (
        {"json": {"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1, 32, 32, 3],
                              "data": [300] * 3072}]}}, "invalid_inference_request"),
    "unknown output": (
        {"json": {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}],
                  "outputs": [{"name": "LOGITS"}]}}, "unknown_output"),
    "not JSON": ({"content": b"\x00not json"}, "invalid_inference_request"),
    "JSON nested too deeply": ({"content": b"[" * 100_000}, "invalid_inference_request"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_requests_whose_claims_do_not_add_up_are_400_problems(live: Live, case: str):
    request, code = HOSTILE[case]

    answer = live.post("/v2/models/alpha/infer", **request)

    assert (answer.status_code, answer.json()["code"]) == (400, code), answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["error"] == answer.json()["detail"]  # where KServe/Triton clients read it


def test_bodies_over_the_image_limit_are_413_and_bytes_that_are_not_images_are_415(live: Live):
    big = bytes(MAX_IMAGE_MB * 2**20 + 1)
    answer = live.post("/v2/models/alpha/infer", **binary_request(fp32([1, 3, 32, 32], size=len(big)), big))
    assert (answer.status_code, answer.json()["code"]) == (413, "payload_too_large")
    assert "TUNESERVE_MAX_IMAGE_MB" in answer.json()["error"]
    answer = live.post("/v2/models/alpha/infer", json={"inputs": [{"name": "IMAGE", "datatype": "BYTES",
                                                                   "shape": [1], "data": ["bm90IGFuIGltYWdl"]}]})
    assert (answer.status_code, answer.json()["code"]) == (415, "not_an_image")
    spool = Path(live.service.env["TUNESERVE_DATA_DIR"]) / "tmp"
    assert [p.name for p in spool.glob(".upload-*")] == []  # spooled BYTES elements are removed


def test_no_key_is_401_with_the_oip_error_field(live: Live):
    answer = httpx.get(f"{live.service.url}/v2/models/alpha", headers={"X-Request-ID": f"r-{uuid.uuid4().hex[:8]}"})
    body = answer.json()
    assert (answer.status_code, body["code"]) == (401, "missing_api_key")
    assert body["error"] == body["detail"] and body["instance"] == answer.headers["x-request-id"]
