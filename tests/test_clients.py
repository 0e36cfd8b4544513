"""What clients are promised: idempotent job creation, API keys, per-key caps, upload limits."""

import httpx
import pytest
from fastapi.testclient import TestClient

from shared.config import get_settings
from tests.helpers import files_under, ready_dataset, run_in_threads


@pytest.fixture
def client(migrated):
    from api.main import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


def test_same_idempotency_key_and_body_return_the_same_job(client):
    body = {"dataset_id": ready_dataset(), "hyperparameters": {"epochs": 2}}
    first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
    second = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert client.get("/v1/jobs").json()["count"] == 1


def test_same_idempotency_key_with_another_body_is_409(client):
    dataset_id = ready_dataset()
    client.post("/v1/jobs", json={"dataset_id": dataset_id, "hyperparameters": {"epochs": 2}},
                headers={"Idempotency-Key": "k-2"})
    response = client.post("/v1/jobs", json={"dataset_id": dataset_id, "hyperparameters": {"epochs": 3}},
                           headers={"Idempotency-Key": "k-2"})
    assert response.status_code == 409 and response.json()["code"] == "idempotency_key_reused"
    assert client.get("/v1/jobs").json()["count"] == 1


def test_racing_requests_with_one_idempotency_key_make_one_job(migrated, start_service):
    service = start_service(migrated, workers=0)
    body = {"dataset_id": ready_dataset(), "hyperparameters": {"epochs": 2}}

    def post() -> str:
        response = httpx.post(f"{service.url}/v1/jobs", json=body, headers={"Idempotency-Key": "race"}, timeout=30)
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    ids = run_in_threads([post] * 8)
    assert len(ids) == 8 and len(set(ids)) == 1
    assert httpx.get(f"{service.url}/v1/jobs", timeout=30).json()["count"] == 1


def test_api_keys_guard_every_route_but_health(make_app):
    with make_app(TUNESERVE_API_KEYS="alpha, beta") as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        missing = client.get("/v1/jobs")
        assert missing.status_code == 401 and missing.json()["code"] == "missing_api_key"
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = client.get("/v1/jobs", headers={"Authorization": "Bearer gamma"})
        assert wrong.status_code == 401 and wrong.json()["code"] == "invalid_api_key"
        assert client.get("/v1/jobs", headers={"Authorization": "Basic alpha"}).status_code == 401
        for key in ("alpha", "beta"):
            assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert client.post("/v1/predict", files={"file": ("a.jpg", b"x")}).status_code == 401


def test_per_key_cap_on_active_jobs_is_429(make_app):
    with make_app(TUNESERVE_API_KEYS="alpha,beta", TUNESERVE_MAX_ACTIVE_JOBS_PER_KEY="2") as client:
        dataset_id = ready_dataset()
        alpha = {"Authorization": "Bearer alpha"}
        mine = [client.post("/v1/jobs", json={"dataset_id": dataset_id}, headers=alpha) for _ in range(2)]
        assert [r.status_code for r in mine] == [202, 202]
        capped = client.post("/v1/jobs", json={"dataset_id": dataset_id}, headers=alpha)
        assert capped.status_code == 429 and capped.json()["code"] == "too_many_jobs"
        beta = client.post("/v1/jobs", json={"dataset_id": dataset_id}, headers={"Authorization": "Bearer beta"})
        assert beta.status_code == 202
        client.post(f"/v1/jobs/{mine[0].json()['id']}/cancel", headers=alpha)
        assert client.post("/v1/jobs", json={"dataset_id": dataset_id}, headers=alpha).status_code == 202


def test_upload_over_the_limit_is_413_before_the_body_is_read(make_app):
    with make_app(TUNESERVE_MAX_UPLOAD_MB="1") as client:
        declared = client.post("/v1/datasets", files={"file": ("big.zip", b"PK\x03\x04" + b"\0" * (3 * 2**20))})
        assert declared.status_code == 413 and declared.json()["code"] == "payload_too_large"

        sent = 0

        def chunks():
            nonlocal sent
            boundary = b"--xyz\r\n"
            yield boundary + b'Content-Disposition: form-data; name="file"; filename="big.zip"\r\n\r\nPK\x03\x04'
            for _ in range(64):  # 64 MiB offered, no Content-Length: the server must stop reading early
                sent += 2**20
                yield b"\0" * 2**20
            yield b"\r\n--xyz--\r\n"

        streamed = client.post("/v1/datasets", content=chunks(),
                               headers={"content-type": "multipart/form-data; boundary=xyz"})
        assert streamed.status_code == 413 and streamed.json()["code"] == "payload_too_large"
        assert files_under(get_settings().data_dir / "tmp") == []
        assert client.get("/v1/datasets").json()["count"] == 0
