"""The whole service over HTTP: upload, train, predict. Real Postgres, Redis and Celery worker, then
the same flow on the embedded defaults (SQLite + filesystem broker)."""

import time
from pathlib import Path

import pytest

from tests.processes import Service, wait_for
from tests.synthetic import make_heldout, make_zip

CLASSES = ["red", "green", "blue"]


def run_walkthrough(service: Service, tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "shapes.zip", classes=CLASSES, per_class=24, wrapper="shapes/")
    with service.client() as client:
        before = client.post("/predict", files={"file": ("x.jpg", make_heldout(["red"], 1)[0][1], "image/jpeg")})
        assert before.status_code == 503 and before.json()["code"] == "no_model"

        created = client.post("/v1/datasets", files={"file": ("shapes.zip", archive.read_bytes(), "application/zip")})
        assert created.status_code == 202, created.text
        assert created.json()["status"] == "processing"
        dataset_id = created.json()["id"]

        dataset = wait_for(lambda: (d := client.get(f"/v1/datasets/{dataset_id}").json())["status"] != "processing"
                           and d, 60, what="ingestion")
        assert dataset["status"] == "ready", (dataset, service.logs())
        assert dataset["classes"] == sorted(CLASSES)
        assert dataset["class_counts"] == {c: 24 for c in CLASSES}

        # The README walk-through's request on resnet18 (the walk-through keeps resnet50; here what is checked is
        # the flow and that the defaults learn, and resnet18 does both in a fraction of the time on a CPU):
        # everything else is the defaults.
        job = client.post("/v1/jobs", json={"dataset_id": dataset_id, "hyperparameters": {
            "base_model": "resnet18", "epochs": 3, "image_size": 32, "weights": "none"}})
        assert job.status_code == 202, job.text
        assert job.json()["status"] == "queued"
        job_id = job.json()["id"]

        seen: set[str] = set()

        def finished() -> dict | None:
            body = client.get(f"/v1/jobs/{job_id}").json()
            seen.add(body["status"])
            return body if body["status"] in ("succeeded", "failed", "cancelled") else None

        final = wait_for(finished, 300, interval=0.2, what="training")
        assert final["status"] == "succeeded", (final["error"], service.logs())
        assert "running" in seen
        assert final["attempts"] == 1
        assert [h["epoch"] for h in final["history"]] == [1, 2, 3]
        assert final["model_id"] and final["metrics"]["test"]["samples"] > 0
        assert client.get(f"/v1/models/{final['model_id']}").json()["base_model"] == "resnet18"

        heldout = make_heldout(CLASSES, 10)
        files = [("file", (f"{label}_{i}.jpg", data, "image/jpeg")) for i, (label, data) in enumerate(heldout)]
        started = time.monotonic()
        response = client.post("/predict", files=files)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model_id"] == final["model_id"]
        assert len(body["predictions"]) == len(heldout)
        assert all(len(p["top"]) == 3 for p in body["predictions"])  # top_k 5 clamped to 3 classes
        correct = sum(p["top"][0]["label"] == label for p, (label, _) in zip(body["predictions"], heldout, strict=True))
        # One run from scratch on 72 images varies with the order the archive is read in and the thread count:
        # resnet50 scored 25 to 30 of 30 here, resnet18 30 of 30 in 8 runs (1 and 2 threads). bench/quality.py
        # measures the mean over seeds (0.99 on this data); a model at chance (10 of 30, what these defaults gave
        # before issue 13) fails this by far.
        assert correct / len(heldout) >= 0.8, (correct, time.monotonic() - started)


@pytest.mark.slow
def test_walkthrough_on_postgres_redis_and_a_celery_worker(migrated, start_service, tmp_path):
    run_walkthrough(start_service(migrated), tmp_path)


@pytest.mark.slow
def test_walkthrough_on_embedded_defaults(env_for, start_service, tmp_path):
    env = env_for()
    run_walkthrough(start_service(env), tmp_path)
