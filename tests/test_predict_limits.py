"""/predict against images built to hurt: formats outside the allow-list, requests that decode to too many
pixels, huge JPEGs (decoded small), 16-bit images (never widened at full size), and more requests in
flight than the inference queue holds."""

import io
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.errors import ApiError
from api.images import open_upload
from api.predictor import Batcher
from shared.images import to_rgb
from tests.model_rows import publish_model
from tests.synthetic import jpeg_bytes, make_image


@pytest.fixture
def make_client(make_app):
    """An app with one servable model in project default."""

    def make(**settings: str) -> TestClient:
        client = make_app(**settings)
        publish_model()
        return client

    return make


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_formats_outside_the_allow_list_are_415_even_if_pillow_reads_them(make_client):
    with make_client() as client:
        for fmt in ("PPM", "ICO", "TGA"):
            data = encoded(Image.new("RGB", (64, 64), (200, 30, 30)), fmt)
            answer = client.post("/v1/predict", files={"file": (f"x.{fmt.lower()}", data)})
            assert (answer.status_code, answer.json()["code"]) == (415, "not_an_image"), fmt
        good = client.post("/v1/predict", files={"file": ("x.png", encoded(Image.new("RGB", (64, 64)), "PNG"))})
        assert good.status_code == 200


def test_a_request_over_its_pixel_budget_is_413_before_decoding(make_client):
    with make_client(TUNESERVE_PREDICT_MAX_REQUEST_MEGAPIXELS="1") as client:
        png = encoded(Image.new("RGB", (800, 800), (10, 200, 10)), "PNG")
        one = client.post("/v1/predict", files=[("file", ("a.png", png))])
        assert one.status_code == 200
        two = client.post("/v1/predict", files=[("file", ("a.png", png)), ("file", ("b.png", png))])
        assert (two.status_code, two.json()["code"]) == (413, "too_many_pixels")
        assert "1 allowed per request" in two.json()["detail"]


def test_the_pixel_limit_is_per_request_and_leaves_pillows_process_wide_one_alone(make_client):
    before = Image.MAX_IMAGE_PIXELS
    with make_client(TUNESERVE_MAX_IMAGE_PIXELS="10000") as client:
        png = encoded(Image.new("RGB", (120, 100), (10, 200, 10)), "PNG")
        refused = client.post("/v1/predict", files=[("file", ("big.png", png))])
        assert (refused.status_code, refused.json()["code"]) == (422, "too_many_pixels")
        assert "over the 10000 pixel limit" in refused.json()["detail"]
        assert before == Image.MAX_IMAGE_PIXELS
        small = encoded(Image.new("RGB", (100, 100), (10, 200, 10)), "PNG")
        assert client.post("/v1/predict", files=[("file", ("ok.png", small))]).status_code == 200
    assert before == Image.MAX_IMAGE_PIXELS


def test_an_image_past_pillows_own_bomb_limit_is_422_too_many_pixels_not_corrupt(make_client):
    with make_client(TUNESERVE_MAX_IMAGE_PIXELS=str(10**9)) as client:
        side = 13_500  # 182 megapixels: under our limit, over twice Pillow's process-wide MAX_IMAGE_PIXELS
        refused = client.post("/v1/predict", files=[("file", ("huge.png", encoded(Image.new("1", (side, side)),
                                                                                   "PNG")))])
    assert (refused.status_code, refused.json()["code"]) == (422, "too_many_pixels")
    assert refused.json()["detail"].startswith("'huge.png' is refused by the image decoder: Image size (182250000 "
                                               "pixels) exceeds limit")


def test_fifty_photos_in_one_request_still_work(make_client):
    with make_client() as client:
        photo = jpeg_bytes(make_image("red", random.Random(0), 1200))
        answer = client.post("/v1/predict", files=[("file", (f"{i}.jpg", photo)) for i in range(50)])
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 50


def test_a_large_jpeg_decodes_at_a_reduced_scale(tmp_path: Path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), (90, 120, 200)).save(path, quality=80)
    image = open_upload(path, "big.jpg", max_pixels=64_000_000, draft_side=256)
    try:
        assert image.size == (500, 375)  # 1/8 scale: the smallest that still covers 256 px
    finally:
        image.close()


def test_a_16_bit_image_comes_down_to_8_bits_without_a_full_size_float_copy():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 65535, (3000, 3000), dtype=np.uint16))
    assert image.mode.startswith("I;16")
    tracemalloc.start()
    try:
        rgb = to_rgb(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rgb.mode == "RGB" and rgb.size == (3000, 3000)
    # A float64 copy alone would be 72 MB; what is left is the uint16 view, the uint8 result and strips.
    assert peak < 60 * 2**20, peak
    expected = (np.asarray(image, dtype=np.float64) * (255.0 / 65534)).astype(np.uint8)
    assert np.abs(np.asarray(rgb)[..., 0].astype(int) - expected).max() <= 1


def test_past_the_pending_limit_requests_get_503_overloaded_with_retry_after():
    batcher = Batcher(max_batch=4, max_wait_s=0.001, max_pending=2)
    try:
        with batcher.expecting(), batcher.expecting():
            with pytest.raises(ApiError) as refused, batcher.expecting():
                pass
            assert (refused.value.status_code, refused.value.code) == (503, "overloaded")
            assert refused.value.headers == {"Retry-After": "1"}
        with batcher.expecting():  # the slots came back
            pass
    finally:
        batcher.close()
