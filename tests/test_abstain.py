"""Calibrated scores and abstain: the predictor divides logits by the model's temperature, predictions carry
``label`` (null under the model's threshold or the request's ``min_score``), PATCH /v1/models/{id} sets the
threshold, and a trained job records its temperature and test ECE before and after."""

import math
import random
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from shared.config import get_settings
from shared.db import session_scope
from shared.orm import Model
from shared.storage import model_dir, read_json, write_json
from tests.model_rows import CLASSES, publish_model
from tests.synthetic import jpeg_bytes, make_image

IMAGE = jpeg_bytes(make_image("red", random.Random(0)))


@pytest.fixture
def api(migrated) -> Iterator[TestClient]:
    from api.main import create_app

    with TestClient(create_app()) as client:
        yield client


def predict(api: TestClient, model_id: str, **fields: str) -> dict:
    response = api.post("/v1/predict", files={"file": ("red.jpg", IMAGE, "image/jpeg")},
                        data={"model_id": model_id, "top_k": "3", **fields})
    assert response.status_code == 200, response.text
    return response.json()["predictions"][0]


def with_temperature(model_id: str, temperature: float) -> None:
    path = model_dir(get_settings(), model_id) / "model.json"
    write_json(path, read_json(path) | {"temperature": temperature})


def test_the_predictor_divides_logits_by_the_models_temperature(api):
    plain, scaled = publish_model(seed=3), publish_model(seed=3)  # the same weights
    with_temperature(scaled, 4.0)

    raw = {s["label"]: s["score"] for s in predict(api, plain)["top"]}
    calibrated = {s["label"]: s["score"] for s in predict(api, scaled)["top"]}

    # softmax(logits / T) from the raw softmax: log p differs from the logits by one constant per row.
    weights = {label: math.exp(math.log(p) / 4.0) for label, p in raw.items()}
    expected = {label: w / sum(weights.values()) for label, w in weights.items()}
    assert calibrated == pytest.approx(expected, abs=1e-4)
    assert max(calibrated, key=calibrated.get) == max(raw, key=raw.get)
    assert max(calibrated.values()) < max(raw.values())


def test_an_old_model_keeps_raw_scores_no_threshold_and_always_a_label(api):
    model_id = publish_model(seed=4)  # model.json without temperature, row without thresholds

    body = api.get(f"/v1/models/{model_id}").json()
    prediction = predict(api, model_id)

    assert (body["temperature"], body["min_score"], body["class_min_scores"]) == (1.0, 0.0, None)
    assert prediction["label"] == prediction["top"][0]["label"]


def test_label_is_null_under_the_models_threshold_and_under_the_requests(api):
    model_id = publish_model(seed=5)
    top = predict(api, model_id)["top"][0]

    assert predict(api, model_id, min_score=str(top["score"] - 0.01))["label"] == top["label"]
    assert predict(api, model_id, min_score=str(top["score"] + 0.01))["label"] is None
    patched = api.patch(f"/v1/models/{model_id}", json={"min_score": round(top["score"] + 0.01, 4)})
    assert patched.status_code == 200, patched.text
    assert patched.json()["min_score"] == round(top["score"] + 0.01, 4)
    assert predict(api, model_id)["label"] is None
    # The request cannot lower the model's threshold, only raise it.
    assert predict(api, model_id, min_score="0")["label"] is None
    reset = api.patch(f"/v1/models/{model_id}", json={"min_score": None})  # null: never abstain again
    assert (reset.status_code, reset.json()["min_score"]) == (200, 0.0)
    assert predict(api, model_id)["label"] == top["label"]


def test_a_per_class_threshold_overrides_the_global_one_for_its_label(api):
    model_id = publish_model(seed=6)
    top = predict(api, model_id)["top"][0]
    other = next(c for c in CLASSES if c != top["label"])

    strict_other = api.patch(f"/v1/models/{model_id}", json={"class_min_scores": {other: 1.0}})
    assert strict_other.status_code == 200 and strict_other.json()["class_min_scores"] == {other: 1.0}
    assert predict(api, model_id)["label"] == top["label"]
    strict_top = api.patch(f"/v1/models/{model_id}", json={"class_min_scores": {top["label"]: 1.0}})
    assert strict_top.json()["min_score"] == 0.0  # fields left out keep their value
    assert predict(api, model_id)["label"] is None
    cleared = api.patch(f"/v1/models/{model_id}", json={"class_min_scores": None})
    assert cleared.json()["class_min_scores"] is None and predict(api, model_id)["label"] == top["label"]


@pytest.mark.parametrize("raw", ["abc", "1.5", "-0.1", "nan", "inf"])
def test_a_bad_request_min_score_is_422_and_names_the_field(api, raw):
    model_id = publish_model(seed=7)

    response = api.post("/v1/predict", files={"file": ("red.jpg", IMAGE, "image/jpeg")},
                        data={"model_id": model_id, "min_score": raw})

    assert (response.status_code, response.json()["code"]) == (422, "validation_error")
    assert response.json()["detail"].startswith("min_score:")


@pytest.mark.parametrize(("body", "code"), [
    ({"min_score": 1.01}, "validation_error"),
    ({"min_score": -1}, "validation_error"),
    ({"min_score": "high"}, "validation_error"),
    ({"class_min_scores": {"red": 2}}, "validation_error"),
    ({"threshold": 0.5}, "validation_error"),
    ({"class_min_scores": {"purple": 0.5}}, "unknown_class"),
])
def test_a_bad_patch_is_422_and_changes_nothing(api, body, code):
    model_id = publish_model(seed=8)
    assert api.patch(f"/v1/models/{model_id}", json={"min_score": 0.25}).status_code == 200

    response = api.patch(f"/v1/models/{model_id}", json=body)

    assert (response.status_code, response.json()["code"]) == (422, code), response.text
    with session_scope() as session:
        row = session.get(Model, model_id)
        assert (row.min_score, row.class_min_scores) == (0.25, None)


def test_patch_of_a_model_that_does_not_exist_is_404(api):
    response = api.patch("/v1/models/4b6c0b1e-0000-0000-0000-000000000000", json={"min_score": 0.5})
    assert (response.status_code, response.json()["code"]) == (404, "model_not_found")


def test_a_trained_job_stores_its_temperature_and_test_ece_before_and_after(migrated):
    from shared.orm import Dataset, Job
    from shared.storage import dataset_cache
    from tests.training_helpers import TINY, write_cache
    from worker.training.job import run_training_job

    with session_scope() as session:
        dataset = Dataset(name="colours", status="ready", filename="c.zip", classes=["red", "green", "blue"])
        session.add(dataset)
        session.flush()
        job = Job(dataset_id=dataset.id, status="queued", hyperparameters={**TINY, "epochs": 2, "learning_rate": 1e-3})
        session.add(job)
        session.flush()
        dataset_id, job_id = dataset.id, job.id
    write_cache(dataset_cache(get_settings(), dataset_id), classes=["red", "green", "blue"], per_class=10)

    run_training_job(job_id)

    with session_scope() as session:
        model = session.get(Model, session.get(Job, job_id).model_id)
        calibration, test, model_id = model.metrics["calibration"], model.metrics["test"], model.id
    assert calibration["fitted_on"] == model.metrics["val"]["samples"] > 0
    assert 0.05 <= calibration["temperature"] <= 20
    assert calibration["ece_before"] == pytest.approx(test["ece"])
    assert 0 <= calibration["ece_after"] <= 1 and calibration["nll_after"] > 0
    assert read_json(model_dir(get_settings(), model_id) / "model.json")["temperature"] == calibration["temperature"]
