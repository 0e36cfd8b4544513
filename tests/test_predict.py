"""POST /v1/predict in process on Postgres: answers equal an offline forward pass, top_k, many files, and
every error a client can cause (none of which stops the server from answering the next request)."""

import io
import random
from collections.abc import Callable, Iterator

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from shared.config import get_settings
from shared.modeling import eval_transform, load_model_artifact
from shared.storage import model_dir
from tests.model_rows import CLASSES, publish_model
from tests.synthetic import jpeg_bytes, make_image


@pytest.fixture
def make_api(migrated, monkeypatch) -> Iterator[Callable[..., TestClient]]:
    """An in-process API on the migrated database; keyword arguments become TUNESERVE_* settings."""
    clients: list[TestClient] = []

    def make(**settings: str) -> TestClient:
        from api.main import create_app

        for key, value in settings.items():
            monkeypatch.setenv(f"TUNESERVE_{key.upper()}", value)
        get_settings.cache_clear()
        client = TestClient(create_app())
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def api(make_api) -> TestClient:
    return make_api()


def photo(seed: int, label: str = "red") -> bytes:
    return jpeg_bytes(make_image(label, random.Random(seed), size=56))


def predict(api: TestClient, files: list[tuple[str, bytes]], **data: str):
    return api.post("/v1/predict", files=[("file", (name, body, "image/jpeg")) for name, body in files], data=data)


def offline_probabilities(model_id: str, images: list[bytes]) -> list[list[float]]:
    """The saved model run on each image alone, outside the server."""
    model, meta = load_model_artifact(directory=model_dir(get_settings(), model_id))
    result = []
    for image in images:
        x = eval_transform(Image.open(io.BytesIO(image)).convert("RGB"), image_size=meta["image_size"],
                           mean=tuple(meta["mean"]), std=tuple(meta["std"]))
        with torch.inference_mode():
            result.append(torch.softmax(model(x.unsqueeze(0)), dim=1)[0].tolist())
    return result


def scores(prediction: dict) -> dict[str, float]:
    return {s["label"]: s["score"] for s in prediction["top"]}


def test_nothing_trained_yet_is_503_no_model(api):
    response = predict(api, [("a.jpg", photo(0))])
    assert response.status_code == 503
    assert response.json()["code"] == "no_model"


def test_probabilities_equal_an_offline_forward_pass_of_the_saved_model(api):
    model_id = publish_model()
    image = jpeg_bytes(make_image("green", random.Random(3), size=80))  # not square: resize + centre crop
    response = predict(api, [("leaf.jpg", image)], top_k="3")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_id"] == model_id
    [expected] = offline_probabilities(model_id, [image])
    got = scores(body["predictions"][0])
    assert [got[c] for c in CLASSES] == pytest.approx(expected, abs=1e-5)
    assert max(expected) < 0.99  # a non-degenerate distribution, so the comparison means something


def test_many_files_in_one_request_keep_their_order_and_each_matches_offline(api):
    model_id = publish_model()
    files = [(f"img{i:02d}.jpg", photo(i, CLASSES[i % 3])) for i in range(40)]  # more than one batch of 32
    response = predict(api, files, top_k="3")
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["filename"] for p in predictions] == [name for name, _ in files]
    offline = offline_probabilities(model_id, [image for _, image in files])
    for prediction, expected in zip(predictions, offline, strict=True):
        got = scores(prediction)
        assert [got[c] for c in CLASSES] == pytest.approx(expected, abs=1e-5)


def test_top_k_defaults_to_5_clamped_to_the_class_count_and_is_sorted(api):
    publish_model()
    default = predict(api, [("a.jpg", photo(1))]).json()["predictions"][0]["top"]
    assert len(default) == 3
    assert sorted(s["label"] for s in default) == CLASSES
    assert [s["score"] for s in default] == sorted((s["score"] for s in default), reverse=True)
    assert sum(s["score"] for s in default) == pytest.approx(1.0, abs=1e-5)
    two = predict(api, [("a.jpg", photo(1))], top_k="2").json()["predictions"][0]["top"]
    assert two == default[:2]
    assert len(predict(api, [("a.jpg", photo(1))], top_k="1000").json()["predictions"][0]["top"]) == 3


@pytest.mark.parametrize(("field", "value"), [
    ("top_k", "0"), ("top_k", "-2"), ("top_k", "abc"), ("top_k", "1.5"), ("top_k", "\u00b2"),
    ("min_score", "-0.1"), ("min_score", "1.5"), ("min_score", "nan"), ("min_score", "high"),
    ("model_id", "m" * 65), ("project", "Not A Project"), ("project", "x" * 64),
])
def test_a_bad_form_field_is_422_naming_it(api, field, value):
    publish_model()
    response = predict(api, [("a.jpg", photo(0))], **{field: value})
    assert response.status_code == 422, response.text
    body = response.json()
    assert (body["code"], body["errors"][0]["field"]) == ("validation_error", field)
    assert body["detail"].startswith(f"{field}: ")


def test_the_same_fields_in_the_query_string_are_checked_and_the_form_wins(api):
    publish_model()
    files = [("file", ("a.jpg", photo(0), "image/jpeg"))]
    response = api.post("/v1/predict?top_k=0", files=files)
    assert (response.status_code, response.json()["errors"][0]["field"]) == (422, "top_k")
    two = api.post("/v1/predict?top_k=0", files=files, data={"top_k": "2"})
    assert (two.status_code, len(two.json()["predictions"][0]["top"])) == (200, 2)
    one = api.post("/v1/predict?top_k=1", files=files, data={"top_k": ""})  # an empty field is absent
    assert len(one.json()["predictions"][0]["top"]) == 1


def test_model_id_serves_that_model_and_an_unknown_one_is_404(api):
    older = publish_model(seed=1, age_s=60)
    newer = publish_model(seed=2)
    assert predict(api, [("a.jpg", photo(0))]).json()["model_id"] == newer
    assert predict(api, [("a.jpg", photo(0))], model_id=older).json()["model_id"] == older
    missing = predict(api, [("a.jpg", photo(0))], model_id="00000000-0000-0000-0000-000000000000")
    assert missing.status_code == 404
    assert missing.json()["code"] == "model_not_found"


def test_a_file_that_is_not_an_image_is_415_naming_it_and_the_server_keeps_serving(api):
    model_id = publish_model()
    response = predict(api, [("good.jpg", photo(0)), ("notes.txt", b"just some words, not pixels")])
    assert response.status_code == 415
    assert response.json()["code"] == "not_an_image"
    assert "'notes.txt'" in response.json()["detail"]
    assert predict(api, [("good.jpg", photo(0))]).json()["model_id"] == model_id


def test_a_truncated_image_is_422_naming_it(api):
    publish_model()
    image = photo(0)
    response = predict(api, [("cut.jpg", image[: len(image) // 2])])
    assert response.status_code == 422
    assert response.json()["code"] == "corrupt_image"
    assert "'cut.jpg'" in response.json()["detail"]
    assert predict(api, [("good.jpg", photo(0))]).status_code == 200


def test_an_image_larger_than_max_image_mb_is_413(make_api):
    api = make_api(max_image_mb="1")
    publish_model()
    response = predict(api, [("huge.jpg", b"\xff\xd8" + random.Random(0).randbytes(3 * 2**19))])
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"
    assert "TUNESERVE_MAX_IMAGE_MB" in response.json()["detail"]
    assert predict(api, [("good.jpg", photo(0))]).status_code == 200


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_too_many_pixels_and_extreme_aspect_ratios_are_422(make_api):
    api = make_api(max_image_pixels="10000")
    publish_model()
    bomb = predict(api, [("bomb.png", png(300, 300))])
    assert (bomb.status_code, bomb.json()["code"]) == (422, "too_many_pixels")
    assert "'bomb.png'" in bomb.json()["detail"]
    strip = predict(api, [("strip.png", png(1, 2000))])
    assert (strip.status_code, strip.json()["code"]) == (422, "bad_aspect_ratio")
    assert "1x2000" in strip.json()["detail"]
    assert predict(api, [("ok.png", png(60, 40))]).status_code == 200


def test_a_request_without_files_is_422(api):
    response = api.post("/v1/predict", data={"top_k": "3"}, files=[("other", ("x.txt", b"x", "text/plain"))])
    assert response.status_code == 422
    assert response.json()["code"] == "file_required"
