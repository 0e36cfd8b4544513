"""Uploads through the real API and a Celery worker on Postgres + Redis: refusals a client can read,
and DELETE that removes rows and files but never under a job."""

from pathlib import Path

from sqlalchemy import select

from shared.db import session_scope
from shared.orm import Dataset
from tests.hostile import BLUE, RED, image_folder, solid, write_zip
from tests.processes import Service, wait_for

SERVICE_ENV = {"TUNESERVE_MAX_UPLOAD_MB": "1", "TUNESERVE_CACHE_SIZE": "32"}


def upload(client, archive: Path):
    return client.post("/v1/datasets", files={"file": (archive.name, archive.read_bytes(), "application/zip")})


def finished(client, dataset_id: str) -> dict:
    return wait_for(lambda: (d := client.get(f"/v1/datasets/{dataset_id}").json())["status"] != "processing" and d,
                    60, what=f"ingestion of {dataset_id}")


def check_refusals(service: Service, tmp_path: Path, data_dir: Path) -> None:
    target = tmp_path / "outside" / "evil.jpg"
    target.parent.mkdir()
    slip = write_zip(tmp_path / "slip.zip", {**image_folder({"cats": RED, "dogs": BLUE}, per_class=5),
                                              "../" * 16 + str(target).lstrip("/"): solid(RED)})
    with service.client() as client:
        created = upload(client, slip)
        assert created.status_code == 202 and created.json()["status"] == "processing"

        dataset = finished(client, created.json()["id"])

        assert (dataset["status"], dataset["error_code"]) == ("failed", "unsafe_archive"), service.logs()
        assert dataset["error"].endswith("climbs out of the archive with '..'")
        assert not target.exists()

        big = tmp_path / "big.zip"
        big.write_bytes(b"PK\x03\x04" + bytes(2 * 2**20))
        too_big = upload(client, big)
        assert too_big.status_code == 413 and too_big.json()["code"] == "payload_too_large"
        spool = data_dir / "tmp"
        assert list(spool.iterdir()) == []  # the partial upload was removed

        text = tmp_path / "photos.zip"
        text.write_bytes(b"these are not the photos you are looking for")
        refused = upload(client, text)
        assert refused.status_code == 415 and refused.json()["code"] == "not_an_archive"
        assert "photos.zip" in refused.json()["detail"]


def check_delete(service: Service, tmp_path: Path, data_dir: Path) -> None:
    good = write_zip(tmp_path / "good.zip", image_folder({"cats": RED, "dogs": BLUE}, per_class=5))
    bad = write_zip(tmp_path / "bad.zip", image_folder({"cats": RED}, per_class=5))
    with service.client() as client:
        ready = finished(client, upload(client, good).json()["id"])
        failed = finished(client, upload(client, bad).json()["id"])
        assert (ready["status"], failed["error_code"]) == ("ready", "too_few_classes"), service.logs()
        assert (data_dir / "datasets" / ready["id"] / "cache" / "images.npy").is_file()

        job = client.post("/v1/jobs", json={"dataset_id": ready["id"], "hyperparameters": {
            "base_model": "resnet18", "weights": "none", "epochs": 1, "image_size": 32, "batch_size": 4,
            "min_steps_per_epoch": 1}})
        assert job.status_code == 202, job.text
        in_use = client.delete(f"/v1/datasets/{ready['id']}")
        assert in_use.status_code == 409 and in_use.json()["code"] == "dataset_in_use"
        wait_for(lambda: client.get(f"/v1/jobs/{job.json()['id']}").json()["status"] in ("succeeded", "failed"),
                 120, what="the job to finish")

        for dataset in (ready, failed):
            assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
            assert client.get(f"/v1/datasets/{dataset['id']}").status_code == 404
            assert not (data_dir / "datasets" / dataset["id"]).exists()
    with session_scope() as session:
        statuses = dict(session.execute(select(Dataset.id, Dataset.status).where(
            Dataset.id.in_([ready["id"], failed["id"]]))).all())
    # The finished job keeps its history, so that row stays (marked deleted); the other row is gone.
    assert statuses == {ready["id"]: "deleted"}


def test_refused_uploads_are_explained_and_delete_removes_rows_and_files(migrated, start_service, tmp_path):
    # One service for both stories: starting the API and a worker is most of this test's time.
    service: Service = start_service({**migrated, **SERVICE_ENV})
    data_dir = Path(migrated["TUNESERVE_DATA_DIR"])
    check_refusals(service, tmp_path, data_dir)
    check_delete(service, tmp_path, data_dir)
