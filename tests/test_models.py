"""The model registry over HTTP on Postgres: list, get, promote/unpin (and what /predict serves), delete."""

import random
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from shared.config import get_settings
from shared.orm import new_id
from shared.storage import model_dir
from tests.model_rows import CLASSES, insert_rows, publish_model, write_artifact
from tests.processes import wait_for
from tests.synthetic import jpeg_bytes, make_image


@pytest.fixture
def api(migrated) -> Iterator[TestClient]:
    from api.main import create_app

    with TestClient(create_app()) as client:
        yield client


def served(api: TestClient) -> str:
    image = jpeg_bytes(make_image("red", random.Random(0)))
    response = api.post("/v1/predict", files={"file": ("red.jpg", image, "image/jpeg")})
    assert response.status_code == 200, response.text
    return response.json()["model_id"]


def test_list_is_newest_first_and_flags_the_served_model(api):
    ids = [new_id() for _ in range(3)]
    for model_id, age in zip(ids, (30, 20, 10), strict=True):
        insert_rows(model_id, age_s=age)
    body = api.get("/v1/models").json()
    assert body["count"] == 3
    assert [m["id"] for m in body["data"]] == ids[::-1]
    assert [m["serving"] for m in body["data"]] == [True, False, False]
    assert [m["id"] for m in api.get("/v1/models", params={"limit": 1, "offset": 1}).json()["data"]] == [ids[1]]


def test_get_shows_classes_metrics_job_dataset_and_serving(api):
    model_id = "5f2d6a1e-0000-4000-8000-000000000001"
    metrics = {"test": {"accuracy": 0.9, "top5": 1.0, "per_class": {"red": {"f1": 0.8}}}}
    job_id, dataset_id = insert_rows(model_id, metrics=metrics)
    body = api.get(f"/v1/models/{model_id}").json()
    assert body["classes"] == CLASSES
    assert body["metrics"] == metrics
    assert (body["job_id"], body["dataset_id"]) == (job_id, dataset_id)
    assert (body["base_model"], body["image_size"]) == ("resnet18", 32)
    assert (body["serving"], body["pinned"]) == (True, False)
    missing = api.get("/v1/models/00000000-0000-0000-0000-000000000000")
    assert (missing.status_code, missing.json()["code"]) == (404, "model_not_found")


def test_promote_then_unpin_changes_what_predict_serves(api):
    older = publish_model(seed=1, age_s=60)
    newer = publish_model(seed=2)
    assert served(api) == newer
    promoted = api.post(f"/v1/models/{older}/promote")
    assert promoted.status_code == 200
    assert (promoted.json()["pinned"], promoted.json()["serving"]) == (True, True)
    assert api.get(f"/v1/models/{newer}").json()["serving"] is False
    wait_for(lambda: served(api) == older, 30, what="the promoted model to be served")  # loads in the background
    assert api.delete("/v1/models/pin").status_code == 204
    assert api.get(f"/v1/models/{older}").json()["pinned"] is False
    wait_for(lambda: served(api) == newer, 30, what="the newest model to be served again")


def test_delete_removes_a_model_that_is_not_served_and_refuses_the_served_one(api):
    older = publish_model(age_s=60)
    newer = "5f2d6a1e-0000-4000-8000-000000000002"
    insert_rows(newer)
    write_artifact(newer)
    assert api.delete(f"/v1/models/{older}").status_code == 204
    assert api.get(f"/v1/models/{older}").status_code == 404
    assert not model_dir(get_settings(), older).exists()
    refused = api.delete(f"/v1/models/{newer}")
    assert (refused.status_code, refused.json()["code"]) == (409, "model_serving")
    assert served(api) == newer
