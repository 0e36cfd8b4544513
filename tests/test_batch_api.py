"""POST/GET/cancel/DELETE /v1/batch-predictions against real Postgres and Redis, no worker: what is accepted,
what is refused (with its code, and nothing created), and what each state allows."""

import io
import random
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from shared.config import get_settings
from tests.helpers import files_under, project_row, ready_dataset
from tests.model_rows import publish_model
from tests.synthetic import jpeg_bytes, make_image

URL = "/v1/batch-predictions"


def archive_bytes(count: int = 3) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(count):
            # A fixed date: the same call gives the same bytes.
            image = jpeg_bytes(make_image("red", random.Random(i), 32))
            archive.writestr(zipfile.ZipInfo(f"img{i}.jpg", (2026, 1, 1, 0, 0, 0)), image)
    return buffer.getvalue()


def upload(client: TestClient, data: dict | None = None, content: bytes | None = None, **kwargs):
    files = {"file": ("images.zip", archive_bytes() if content is None else content, "application/zip")}
    return client.post(URL, files=files, data=data or {}, **kwargs)


@pytest.fixture
def client(make_app) -> Iterator[TestClient]:
    with make_app() as client:
        yield client


@pytest.fixture
def model_id(client: TestClient) -> str:
    return publish_model()


def assert_refused(client: TestClient, response, status: int, code: str) -> None:
    assert (response.status_code, response.json()["code"]) == (status, code), response.text
    assert client.get(URL).json() == {"data": [], "count": 0}
    assert files_under(get_settings().data_dir / "batches") == []


def test_an_archive_makes_a_queued_batch_with_the_serving_model_pinned(client: TestClient, model_id: str):
    response = upload(client, data={"top_k": "10"})
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == f"{URL}/{body['id']}"
    assert body["status"] == "queued" and body["source"] == "archive" and body["project"] == "default"
    assert body["model_id"] == model_id
    assert body["top_k"] == 3  # clamped to the model's three classes
    assert body["progress"] == {"total": None, "done": 0, "rejected": 0}
    assert body["filename"] == "images.zip" and body["size_bytes"] == len(archive_bytes())
    assert body["attempts"] == 0 and body["dataset_id"] is None
    assert client.get(f"{URL}/{body['id']}").json() == body
    assert client.get(URL).json() == {"data": [body], "count": 1}
    assert (get_settings().data_dir / "batches" / body["id"] / "upload").read_bytes() == archive_bytes()


def test_a_ready_dataset_by_json(client: TestClient, model_id: str):
    dataset_id = ready_dataset()
    response = client.post(URL, json={"dataset_id": dataset_id, "top_k": 2, "model_id": model_id})
    assert response.status_code == 202, response.text
    body = response.json()
    assert (body["source"], body["dataset_id"], body["top_k"], body["filename"]) == ("dataset", dataset_id, 2, None)


def test_a_bad_top_k_is_422_in_a_form_and_in_json(client: TestClient, model_id: str):
    for top_k in ("0", "abc", "101", "2.5", "\u00b2", "1" * 5000):
        assert_refused(client, upload(client, data={"top_k": top_k}), 422, "validation_error")
    dataset_id = ready_dataset()
    for value in (0, 101, "x"):
        response = client.post(URL, json={"dataset_id": dataset_id, "top_k": value})
        assert_refused(client, response, 422, "validation_error")
        assert response.json()["errors"][0]["field"] == "top_k"


@pytest.mark.parametrize(("field", "value"), [("project", "Not A Project"), ("model_id", "m" * 65),
                                              ("dataset_id", "d" * 65)])
def test_a_bad_form_field_is_422_naming_it(client: TestClient, model_id: str, field: str, value: str):
    response = upload(client, data={field: value})
    assert_refused(client, response, 422, "validation_error")
    assert response.json()["errors"][0]["field"] == field


def test_both_an_archive_and_a_dataset_id_is_422(client: TestClient, model_id: str):
    response = upload(client, data={"dataset_id": ready_dataset()})
    assert_refused(client, response, 422, "source_conflict")


def test_neither_an_archive_nor_a_dataset_id_is_422(client: TestClient, model_id: str):
    response = client.post(URL, files={"other": ("x.txt", b"x")}, data={"top_k": "3"})
    assert_refused(client, response, 422, "source_required")
    response = client.post(URL, json={})
    assert_refused(client, response, 422, "validation_error")
    assert response.json()["errors"][0]["field"] == "dataset_id"


def test_an_unknown_dataset_is_404(client: TestClient, model_id: str):
    response = client.post(URL, json={"dataset_id": "6f1c1a4e-9d2b-4c5e-8a3b-0d9e8f7a6b5c"})
    assert_refused(client, response, 404, "dataset_not_found")


def test_a_dataset_still_processing_is_409(client: TestClient, model_id: str):
    from shared.db import session_scope
    from shared.orm import Dataset

    dataset_id = ready_dataset()
    with session_scope() as session:
        session.get_one(Dataset, dataset_id).status = "processing"
    assert_refused(client, client.post(URL, json={"dataset_id": dataset_id}), 409, "dataset_not_ready")


def test_a_project_with_no_model_is_409_no_model(client: TestClient):
    assert_refused(client, upload(client), 409, "no_model")
    assert_refused(client, client.post(URL, json={"dataset_id": ready_dataset()}), 409, "no_model")


def test_a_model_of_another_project_is_404(client: TestClient, model_id: str):
    project_row("other")
    publish_model(project="other")
    assert_refused(client, upload(client, data={"project": "other", "model_id": model_id}), 404, "model_not_found")


def test_a_dataset_of_another_project_than_named_is_422(client: TestClient, model_id: str):
    project_row("other")
    response = client.post(URL, json={"dataset_id": ready_dataset(), "project": "other"})
    assert_refused(client, response, 422, "validation_error")


def test_a_file_that_is_not_an_archive_is_415(client: TestClient, model_id: str):
    response = upload(client, content=jpeg_bytes(make_image("red", random.Random(0), 32)))
    assert_refused(client, response, 415, "not_an_archive")
    assert files_under(get_settings().data_dir / "tmp") == []


def test_a_body_that_is_neither_multipart_nor_json_is_415(client: TestClient, model_id: str):
    response = client.post(URL, content=b"dataset_id=x", headers={"content-type": "text/plain"})
    assert_refused(client, response, 415, "unsupported_media_type")


def test_an_archive_over_the_upload_cap_is_413(make_app, tmp_path: Path):
    with make_app(TUNESERVE_MAX_UPLOAD_MB="1") as client:
        publish_model()
        big = archive_bytes() + b"\0" * (2 * 2**20)
        assert_refused(client, upload(client, content=big), 413, "payload_too_large")


def test_an_archive_over_the_project_quota_is_413(client: TestClient):
    project_row("small", quota_mb=1)
    publish_model(project="small")
    response = upload(client, data={"project": "small"}, content=archive_bytes() + b"\0" * 2**20)
    assert_refused(client, response, 413, "quota_exceeded")


def test_an_unknown_project_is_404(client: TestClient, model_id: str):
    assert_refused(client, upload(client, data={"project": "nope"}), 404, "project_not_found")
    assert_refused(client, client.post(f"{URL}?project=nope", files={"file": ("a.zip", b"PK")}), 404,
                   "project_not_found")


def test_results_wait_for_success_and_format_is_checked(client: TestClient, model_id: str):
    batch_id = upload(client).json()["id"]
    response = client.get(f"{URL}/{batch_id}/results?format=csv")
    assert (response.status_code, response.json()["code"]) == (409, "batch_not_finished")
    response = client.get(f"{URL}/{batch_id}/results?format=xml")
    assert (response.status_code, response.json()["code"]) == (422, "validation_error")


def test_a_queued_batch_cancels_at_once_and_can_then_be_deleted(client: TestClient, model_id: str):
    batch_id = upload(client).json()["id"]
    response = client.delete(f"{URL}/{batch_id}")
    assert (response.status_code, response.json()["code"]) == (409, "batch_active")
    response = client.post(f"{URL}/{batch_id}/cancel")
    assert response.status_code == 202 and response.json()["status"] == "cancelled"
    assert response.json()["finished_at"] is not None
    assert not (get_settings().data_dir / "batches" / batch_id).exists()  # the upload is gone with it
    response = client.post(f"{URL}/{batch_id}/cancel")
    assert (response.status_code, response.json()["code"]) == (409, "batch_finished")
    assert client.delete(f"{URL}/{batch_id}").status_code == 204
    response = client.get(f"{URL}/{batch_id}")
    assert (response.status_code, response.json()["code"]) == (404, "batch_prediction_not_found")


def test_list_filters_by_status_and_project_and_pages(client: TestClient, model_id: str):
    first, second = (upload(client).json()["id"] for _ in range(2))
    client.post(f"{URL}/{first}/cancel")
    assert [b["id"] for b in client.get(f"{URL}?status=cancelled").json()["data"]] == [first]
    assert [b["id"] for b in client.get(f"{URL}?status=queued").json()["data"]] == [second]
    page = client.get(f"{URL}?limit=1&offset=1").json()
    assert page["count"] == 2 and len(page["data"]) == 1
    assert client.get(f"{URL}?project=default").json()["count"] == 2
    assert client.get(f"{URL}/not-a-uuid").json()["code"] == "batch_prediction_not_found"


def test_a_dataset_a_queued_batch_reads_cannot_be_deleted(client: TestClient, model_id: str):
    dataset_id = ready_dataset()
    batch_id = client.post(URL, json={"dataset_id": dataset_id}).json()["id"]
    response = client.delete(f"/v1/datasets/{dataset_id}")
    assert (response.status_code, response.json()["code"]) == (409, "dataset_in_use")
    client.post(f"{URL}/{batch_id}/cancel")
    assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 204


def test_a_batchs_upload_counts_against_its_project_and_holds_the_project(client: TestClient):
    project_row("team")
    publish_model(project="team")
    before = client.get("/v1/projects/team").json()["usage"]["bytes"]
    batch_id = upload(client, data={"project": "team"}).json()["id"]
    assert client.get("/v1/projects/team").json()["usage"]["bytes"] == before + len(archive_bytes())
    response = client.delete("/v1/projects/team")
    assert (response.status_code, response.json()["code"]) == (409, "project_not_empty")
    assert "1 batch_predictions" in response.json()["detail"]
    client.post(f"{URL}/{batch_id}/cancel")
    assert client.delete(f"{URL}/{batch_id}").status_code == 204
    assert client.get("/v1/projects/team").json()["usage"]["bytes"] == before


def test_an_upload_that_would_eat_the_disk_reserve_is_507(make_app):
    with make_app(TUNESERVE_MIN_FREE_DISK_GB="1000000") as client:
        publish_model()
        assert_refused(client, upload(client), 507, "insufficient_storage")
        assert files_under(get_settings().data_dir / "tmp") == []
