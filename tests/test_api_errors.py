"""Every 4xx path of the REST API answers with the right status and machine code, and loses nothing."""

import io
import zipfile

import pytest
from fastapi.testclient import TestClient

from shared.config import get_settings
from shared.jobstate import DatasetStatus, JobStatus
from tests.helpers import files_under, job_row, ready_dataset
from tests.synthetic import make_heldout

MISSING = "00000000-0000-0000-0000-000000000000"


@pytest.fixture
def client(migrated):
    from api.main import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


def error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code
    assert isinstance(body["detail"], str) and body["detail"]
    return body


@pytest.mark.parametrize(("method", "path", "code"), [
    ("get", f"/v1/datasets/{MISSING}", "dataset_not_found"),
    ("delete", f"/v1/datasets/{MISSING}", "dataset_not_found"),
    ("get", f"/v1/jobs/{MISSING}", "job_not_found"),
    ("post", f"/v1/jobs/{MISSING}/cancel", "job_not_found"),
    ("get", f"/v1/models/{MISSING}", "model_not_found"),
    ("post", f"/v1/models/{MISSING}/promote", "model_not_found"),
    ("get", f"/v1/models/{MISSING}/artifact", "model_not_found"),
    ("delete", f"/v1/models/{MISSING}", "model_not_found"),
    ("get", "/v1/nothing-here", "not_found"),
])
def test_unknown_ids_are_404_with_a_code(client, method, path, code):
    error(getattr(client, method)(path), 404, code)


def test_malformed_json_is_422(client):
    response = client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    error(response, 422, "validation_error")


def test_unknown_hyperparameter_is_422_naming_the_field(client):
    body = error(client.post("/v1/jobs", json={"dataset_id": ready_dataset(), "hyperparameters": {"epoch": 3}}),
                 422, "validation_error")
    assert "hyperparameters.epoch" in body["detail"]
    assert {"field": "hyperparameters.epoch", "message": "Extra inputs are not permitted"} in body["errors"]


@pytest.mark.parametrize(("field", "value"), [
    ("epochs", 0), ("learning_rate", -1), ("optimizer", "rmsprop"), ("freeze", "stages:9"),
    ("weights", "../../etc/passwd.pth"), ("image_size", 8), ("gpus", 0), ("val_fraction", 0.7),
])
def test_out_of_range_hyperparameter_is_422_naming_the_field(client, field, value):
    response = client.post("/v1/jobs", json={"dataset_id": ready_dataset(), "hyperparameters": {field: value}})
    assert f"hyperparameters.{field}" in error(response, 422, "validation_error")["detail"]


def test_job_on_missing_dataset_is_404_and_on_unready_dataset_is_409(client):
    error(client.post("/v1/jobs", json={"dataset_id": MISSING}), 404, "dataset_not_found")
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("a/1.jpg", b"x")
    created = client.post("/v1/datasets", files={"file": ("d.zip", zipped.getvalue())})
    assert created.status_code == 202
    error(client.post("/v1/jobs", json={"dataset_id": created.json()["id"]}), 409, "dataset_not_ready")


def test_upload_that_is_not_an_archive_is_415_and_leaves_no_files(client):
    body = error(client.post("/v1/datasets", files={"file": ("photo.zip", b"\xff\xd8\xff\xe0 not a zip")}),
                 415, "not_an_archive")
    assert "photo.zip" in body["detail"]
    assert files_under(get_settings().data_dir / "datasets") == []
    assert files_under(get_settings().data_dir / "tmp") == []
    assert client.get("/v1/datasets").json()["count"] == 0


def test_upload_that_is_not_multipart_is_415(client):
    error(client.post("/v1/datasets", content=b"PK\x03\x04", headers={"content-type": "application/zip"}),
          415, "unsupported_media_type")


def test_upload_without_a_file_part_is_422(client):
    error(client.post("/v1/datasets", data={"name": "x"}, files={"other": ("a.zip", b"PK\x03\x04")}),
          422, "file_required")


@pytest.mark.parametrize("project", ["Not A Project", "x" * 64, "-leading-dash"])
def test_upload_to_a_malformed_project_name_is_422_and_leaves_no_files(client, project):
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("a/1.jpg", b"x")
    body = error(client.post("/v1/datasets", data={"project": project}, files={"file": ("d.zip", zipped.getvalue())}),
                 422, "validation_error")
    assert body["errors"][0]["field"] == "project"
    assert files_under(get_settings().data_dir / "datasets") == []
    assert files_under(get_settings().data_dir / "tmp") == []
    assert client.get("/v1/datasets").json()["count"] == 0


def test_predict_before_any_model_is_503_no_model(client):
    image = make_heldout(["red"], 1)[0][1]
    error(client.post("/v1/predict", files={"file": ("a.jpg", image)}), 503, "no_model")
    error(client.post("/predict", files={"file": ("a.jpg", image)}), 503, "no_model")


def test_cancel_of_a_queued_job_is_immediate_and_of_a_final_job_is_409(client):
    job_id = job_row(ready_dataset())
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202 and response.json()["status"] == "cancelled"
    error(client.post(f"/v1/jobs/{job_id}/cancel"), 409, "job_finished")


def test_cancel_of_a_running_job_asks_the_worker(client):
    job_id = job_row(ready_dataset(), JobStatus.running)
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelling"
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelling"


def test_deleting_a_dataset_in_use_is_409_and_keeps_it(client):
    dataset_id = ready_dataset()
    job_row(dataset_id, JobStatus.running)
    error(client.delete(f"/v1/datasets/{dataset_id}"), 409, "dataset_in_use")
    assert client.get(f"/v1/datasets/{dataset_id}").status_code == 200


def test_list_jobs_filters_by_status_and_paginates(client):
    dataset_id = ready_dataset()
    ids = [job_row(dataset_id) for _ in range(3)]
    job_row(dataset_id, JobStatus.running)
    page = client.get("/v1/jobs", params={"status": "queued", "limit": 2}).json()
    assert page["count"] == 3 and len(page["data"]) == 2
    rest = client.get("/v1/jobs", params={"status": "queued", "limit": 2, "offset": 2}).json()
    assert {j["id"] for j in page["data"] + rest["data"]} == set(ids)
    error(client.get("/v1/jobs", params={"status": "sleeping"}), 422, "validation_error")


def test_list_datasets_filters_by_status_and_refuses_unknown_states(client):
    ready = ready_dataset()
    failed = ready_dataset(status=DatasetStatus.failed)
    assert [d["id"] for d in client.get("/v1/datasets", params={"status": "ready"}).json()["data"]] == [ready]
    assert [d["id"] for d in client.get("/v1/datasets", params={"status": "failed"}).json()["data"]] == [failed]
    assert client.get("/v1/datasets", params={"status": "processing"}).json() == {"data": [], "count": 0}
    for bogus in ("bogus", "deleted", "READY"):
        error(client.get("/v1/datasets", params={"status": bogus}), 422, "validation_error")


def test_openapi_lists_the_states_of_every_status_field(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert schemas["DatasetStatus"]["enum"] == ["processing", "ready", "failed"]
    assert schemas["JobStatus"]["enum"] == ["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
    assert schemas["DatasetPublic"]["properties"]["status"] == {"$ref": "#/components/schemas/DatasetStatus"}
    assert schemas["JobPublic"]["properties"]["status"] == {"$ref": "#/components/schemas/JobStatus"}
    assert schemas["BatchPredictionPublic"]["properties"]["status"] == {"$ref": "#/components/schemas/JobStatus"}
    assert schemas["WebhookDeliveryPublic"]["properties"]["status"]["enum"] == ["pending", "delivered", "failed"]
    assert schemas["Health"]["properties"]["status"]["enum"] == ["ok", "unavailable"]
