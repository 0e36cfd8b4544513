"""Projects: CRUD and its errors, per-project serving and pins, quotas, usage that matches the disk,
deleting jobs, and two teams training and predicting side by side on a live service."""

import random
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from shared.config import get_settings
from shared.jobstate import JobStatus
from shared.quota import tree_bytes
from tests.helpers import files_under, job_row, project_row, ready_dataset
from tests.live import TINY_JOB
from tests.model_rows import publish_model
from tests.processes import Service, wait_for
from tests.synthetic import jpeg_bytes, make_image, make_zip

ADMIN = "root-bootstrap-key"


@pytest.fixture
def client(make_app: Callable[..., TestClient]):
    with make_app() as test_client:
        yield test_client


def image() -> dict:
    return {"file": ("red.jpg", jpeg_bytes(make_image("red", random.Random(0), 32)), "image/jpeg")}


def test_projects_are_created_read_changed_and_deleted_with_clear_errors(client: TestClient):
    created = client.post("/v1/projects", json={"name": "vision-team", "description": "cats", "quota_mb": 500})
    assert created.status_code == 201
    body = created.json()
    assert (body["name"], body["description"], body["quota_mb"], body["serving_model_id"]) == (
        "vision-team", "cats", 500, None)
    assert body["usage"] == {"datasets": 0, "jobs": 0, "models": 0, "bytes": 0}
    again = client.post("/v1/projects", json={"name": "vision-team"})
    assert (again.status_code, again.json()["code"]) == (409, "project_exists")
    for bad in ({"name": "Vision"}, {"name": "-x"}, {"name": "a" * 64}, {"name": "ok", "quota_mb": 0},
                {"name": "ok", "extra": 1}, {}):
        answer = client.post("/v1/projects", json=bad)
        assert (answer.status_code, answer.json()["code"]) == (422, "validation_error"), bad
    assert client.patch("/v1/projects/vision-team", json={"quota_mb": 10}).json()["quota_mb"] == 10
    assert [p["name"] for p in client.get("/v1/projects").json()["data"]] == ["default", "vision-team"]
    assert client.get("/v1/projects/nope").json()["code"] == "project_not_found"
    protected = client.delete("/v1/projects/default")
    assert (protected.status_code, protected.json()["code"]) == (409, "project_protected")
    ready_dataset(project="vision-team")
    busy = client.delete("/v1/projects/vision-team")
    assert (busy.status_code, busy.json()["code"]) == (409, "project_not_empty")
    assert "1 datasets" in busy.json()["detail"]
    project_row("empty")
    assert client.delete("/v1/projects/empty").status_code == 204
    assert client.get("/v1/projects/empty").status_code == 404
    listed = client.get("/v1/datasets?project=nope")
    assert (listed.status_code, listed.json()["code"]) == (404, "project_not_found")


def test_each_project_serves_its_pin_else_its_newest(client: TestClient):
    project_row("alpha")
    old_alpha = publish_model(project="alpha", seed=1, age_s=120)
    new_alpha = publish_model(project="alpha", seed=2, age_s=60)
    default_model = publish_model(seed=3)  # the newest overall: it must not reach alpha
    assert client.post("/v1/projects/alpha/predict", files=image()).json()["model_id"] == new_alpha
    assert client.post("/predict", files=image()).json()["model_id"] == default_model
    assert client.post("/v1/predict", files=image(), data={"project": "alpha"}).json()["model_id"] == new_alpha

    promoted = client.post(f"/v1/models/{old_alpha}/promote").json()
    assert (promoted["project"], promoted["pinned"], promoted["serving"]) == ("alpha", True, True)
    # The pinned model loads in the background while the current one keeps answering, then takes over.
    wait_for(lambda: client.post("/v1/projects/alpha/predict", files=image()).json()["model_id"] == old_alpha, 30,
             what="the pinned model to be swapped in")
    assert client.get(f"/v1/models/{default_model}").json()["serving"] is True  # other pins untouched
    assert client.get("/v1/projects/alpha").json()["serving_model_id"] == old_alpha
    assert client.delete("/v1/projects/alpha/pin").status_code == 204
    assert client.post("/v1/projects/alpha/predict", files=image()).json()["model_id"] == new_alpha

    elsewhere = client.post("/v1/projects/alpha/predict", files=image(), data={"model_id": default_model})
    assert (elsewhere.status_code, elsewhere.json()["code"]) == (404, "model_not_found")
    project_row("empty")
    nothing = client.post("/v1/projects/empty/predict", files=image())
    assert (nothing.status_code, nothing.json()["code"]) == (503, "no_model")


def test_deleting_a_job_needs_it_final_and_its_model_gone(client: TestClient):
    dataset_id = ready_dataset()
    queued = job_row(dataset_id)
    active = client.delete(f"/v1/jobs/{queued}")
    assert (active.status_code, active.json()["code"]) == (409, "job_active")
    model_id = publish_model()
    job_id = client.get(f"/v1/models/{model_id}").json()["job_id"]
    kept = client.delete(f"/v1/jobs/{job_id}")
    assert (kept.status_code, kept.json()["code"]) == (409, "job_has_model")
    serving = client.delete(f"/v1/models/{model_id}")
    assert (serving.status_code, serving.json()["code"]) == (409, "model_serving")
    assert client.delete(f"/v1/models/{model_id}?force=true").status_code == 204
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert client.get(f"/v1/jobs/{job_id}").status_code == 404
    failed = job_row(dataset_id, JobStatus.failed)
    checkpoints = get_settings().data_dir / "jobs" / failed
    checkpoints.mkdir(parents=True)
    (checkpoints / "checkpoint.pt").write_bytes(b"x" * 100)
    assert client.delete(f"/v1/jobs/{failed}").status_code == 204
    assert not checkpoints.exists()


def test_a_quota_refuses_an_upload_while_it_streams_and_keeps_nothing(client: TestClient, tmp_path: Path):
    project_row("small", quota_mb=1)
    big = {"file": ("big.zip", b"PK\x03\x04" + random.Random(0).randbytes(2 * 2**20), "application/zip")}
    early = client.post("/v1/datasets?project=small", files=big)
    assert (early.status_code, early.json()["code"]) == (413, "quota_exceeded")
    assert "1 MiB left" in early.json()["detail"]
    late = client.post("/v1/datasets", files=big, data={"project": "small"})
    assert (late.status_code, late.json()["code"]) == (413, "quota_exceeded")
    clash = client.post("/v1/datasets?project=small", files=image(), data={"project": "default"})
    assert (clash.status_code, clash.json()["code"]) == (422, "validation_error")
    assert files_under(get_settings().data_dir / "tmp") == []
    assert files_under(get_settings().data_dir / "datasets") == []
    assert client.get("/v1/projects/small").json()["usage"] == {"datasets": 0, "jobs": 0, "models": 0, "bytes": 0}


def ingested(client: httpx.Client, dataset_id: str) -> dict:
    return wait_for(lambda: (d := client.get(f"/v1/datasets/{dataset_id}").json())["status"] != "processing" and d,
                    90, what="ingestion")


@pytest.mark.slow
def test_decoding_past_the_quota_fails_the_dataset_and_keeps_nothing(migrated, start_service, tmp_path: Path):
    service: Service = start_service(migrated)
    project_row("small", quota_mb=1)  # the zip fits; its decoded 256 px cache (~190 KiB an image) does not
    archive = make_zip(tmp_path / "d.zip", classes=["red", "green", "blue"], per_class=8, size=32)
    with service.client() as client:
        created = client.post("/v1/datasets?project=small", files={"file": ("d.zip", archive.read_bytes())})
        assert created.status_code == 202, created.text
        dataset = ingested(client, created.json()["id"])
        assert (dataset["status"], dataset["error_code"]) == ("failed", "quota_exceeded")
        assert "quota" in dataset["error"]
        data_dir = Path(service.env["TUNESERVE_DATA_DIR"])
        assert files_under(data_dir / "datasets") == [] and files_under(data_dir / "tmp") == []
        assert client.get("/v1/projects/small").json()["usage"]["bytes"] == 0


def disk_bytes(data_dir: Path, *, datasets: list[str], jobs: list[str], models: list[str]) -> int:
    """Counted here independently of the service: every file under each resource's folder."""
    folders = ([data_dir / "datasets" / i for i in datasets] + [data_dir / "jobs" / i for i in jobs]
               + [data_dir / "models" / i for i in models])
    return sum(p.stat().st_size for folder in folders for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_two_teams_train_and_predict_side_by_side(migrated, start_service, tmp_path: Path):
    service: Service = start_service({**migrated, "TUNESERVE_API_KEYS": ADMIN})
    data_dir = Path(service.env["TUNESERVE_DATA_DIR"])
    with service.client() as client:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        keys = {}
        for team in ("alpha", "beta"):
            assert client.post("/v1/projects", json={"name": team}, headers=admin).status_code == 201
            made = client.post("/v1/keys", json={"name": team, "role": "member", "projects": [team]}, headers=admin)
            keys[team] = {"Authorization": f"Bearer {made.json()['key']}"}
        archive = make_zip(tmp_path / "d.zip", classes=["red", "green", "blue"], per_class=12, size=32)
        created = client.post("/v1/datasets", files={"file": ("d.zip", archive.read_bytes())},
                              data={"project": "alpha"}, headers=keys["alpha"])
        assert (created.status_code, created.json()["project"]) == (202, "alpha")
        dataset_id = created.json()["id"]
        with httpx.Client(base_url=service.url, headers=keys["alpha"], timeout=60) as alpha:
            assert ingested(alpha, dataset_id)["status"] == "ready"
            job = alpha.post("/v1/jobs", json={"dataset_id": dataset_id, "hyperparameters": TINY_JOB}).json()
            assert job["project"] == "alpha"
            done = wait_for(lambda: (j := alpha.get(f"/v1/jobs/{job['id']}").json())["status"] in (
                "succeeded", "failed") and j, 180, what="training")
            assert done["status"] == "succeeded", service.logs()
            model_id = done["model_id"]
            assert alpha.get(f"/v1/models/{model_id}").json()["project"] == "alpha"
            answer = alpha.post("/v1/projects/alpha/predict", files=image())
            assert (answer.status_code, answer.json()["model_id"]) == (200, model_id)
            hidden = alpha.post("/v1/predict", files=image())  # `default` is not alpha's
            assert (hidden.status_code, hidden.json()["code"]) == (404, "project_not_found")

            usage = alpha.get("/v1/projects/alpha").json()["usage"]
            assert (usage["datasets"], usage["jobs"], usage["models"]) == (1, 1, 1)
            assert usage["bytes"] == disk_bytes(data_dir, datasets=[dataset_id], jobs=[job["id"]],
                                                models=[model_id]) > 0
            assert usage["bytes"] == tree_bytes(data_dir / "datasets" / dataset_id) + tree_bytes(
                data_dir / "models" / model_id)  # a succeeded job keeps no checkpoints

        with httpx.Client(base_url=service.url, headers=keys["beta"], timeout=60) as beta:
            assert beta.get(f"/v1/jobs/{job['id']}").status_code == 404
            assert beta.get(f"/v1/models/{model_id}/artifact").status_code == 404
            empty = beta.post("/v1/projects/beta/predict", files=image())
            assert (empty.status_code, empty.json()["code"]) == (503, "no_model")

        with httpx.Client(base_url=service.url, headers=keys["alpha"], timeout=60) as alpha:
            assert alpha.delete(f"/v1/models/{model_id}?force=true").status_code == 204
            assert alpha.delete(f"/v1/jobs/{job['id']}").status_code == 204
            assert alpha.delete(f"/v1/datasets/{dataset_id}").status_code == 204
            assert alpha.get("/v1/projects/alpha").json()["usage"] == {"datasets": 0, "jobs": 0, "models": 0,
                                                                        "bytes": 0}
        assert files_under(data_dir / "datasets") == files_under(data_dir / "models") == []
        assert client.delete("/v1/projects/alpha", headers=admin).status_code == 204


def test_an_upload_that_would_eat_the_disk_reserve_is_507_before_the_body(make_app: Callable[..., TestClient]):
    with make_app(TUNESERVE_MIN_FREE_DISK_GB="1000000") as client:
        answer = client.post("/v1/datasets", files=image())
        assert (answer.status_code, answer.json()["code"]) == (507, "insufficient_storage")
        assert files_under(get_settings().data_dir / "tmp") == []


def test_the_predictor_keeps_a_bounded_set_of_project_models_warm(make_app: Callable[..., TestClient]):
    with make_app(TUNESERVE_PREDICT_MAX_MODELS="2") as client:
        served: dict[str, str] = {}
        for name in ("p1", "p2", "p3"):
            project_row(name)
            served[name] = publish_model(project=name, seed=len(served))
        for _ in range(2):
            for name, model_id in served.items():
                answer = client.post(f"/v1/projects/{name}/predict", files=image())
                assert (answer.status_code, answer.json()["model_id"]) == (200, model_id)
        assert isinstance(client.app, FastAPI)
        predictor = client.app.state.predictor
        assert len(predictor._models) == 2
        assert set(predictor._models) == {served["p2"], served["p3"]}  # the least recently used project went
