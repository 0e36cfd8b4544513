"""A live service (API + one Celery worker as subprocesses, Postgres, Redis) with two teams' keys: a job that
fails inside training ends ``failed``/``training_error`` and the worker goes on to the next job; a finished
job's plots and misclassified thumbnails are served to its team, and to nobody else."""

import io
import os
import random
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from shared.orm import new_id
from tests.live import CLASSES, TINY_JOB, read_events, serve
from tests.processes import Service, wait_for
from tests.synthetic import jpeg_bytes, make_image

ADMIN = "artifacts-admin-key"
# Held-out splits big enough that the test split has a dozen images to get wrong.
FINISHED_JOB = {"val_fraction": 0.2, "test_fraction": 0.3}
# A dataset's decoded cache cut short on disk (a full disk, a bad copy): the job cannot load it and fails as ours.
TRUNCATED_CACHE_ERROR = "training failed: ValueError: mmap length is greater than file size"


@dataclass
class Teams:
    service: Service
    alpha: dict[str, str]  # headers of a member key of project alpha, which owns the dataset
    beta: dict[str, str]
    dataset_id: str

    def client(self, headers: dict[str, str] | None = None) -> httpx.Client:
        return self.service.client(headers=self.alpha if headers is None else headers)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def colour_blind_zip(path: Path, per_class: int = 12) -> Path:
    """Every class folder holds as many images of each colour: no model beats chance on the test split, so a
    finished model always has misclassified test images (and their thumbnails) to serve."""
    rng = random.Random(0)
    with zipfile.ZipFile(path, "w") as archive:
        for label in CLASSES:
            for i in range(per_class):
                colour = CLASSES[i % len(CLASSES)]
                archive.writestr(f"{label}/{label}_{i:04d}.jpg", jpeg_bytes(make_image(colour, rng, 32)))
    return path


@pytest.fixture(scope="module")
def teams(pg_url, redis_url, tmp_path_factory) -> Iterator[Teams]:
    tmp = tmp_path_factory.mktemp("artifacts")
    with serve(tmp / "data", pg_url, redis_url, TUNESERVE_API_KEYS=ADMIN) as service, \
            service.client(headers=bearer(ADMIN)) as admin:
        keys = {}
        for name in ("alpha", "beta"):
            assert admin.post("/v1/projects", json={"name": name}).status_code == 201
            created = admin.post("/v1/keys", json={"name": f"{name}-key", "role": "member", "projects": [name]})
            assert created.status_code == 201, created.text
            keys[name] = bearer(created.json()["key"])
        archive = colour_blind_zip(tmp / "colour-blind.zip")
        upload = admin.post("/v1/datasets", data={"project": "alpha"},
                            files={"file": (archive.name, archive.read_bytes(), "application/zip")})
        assert upload.status_code == 202, upload.text
        dataset_id = upload.json()["id"]
        dataset = wait_for(lambda: (d := admin.get(f"/v1/datasets/{dataset_id}").json())["status"] != "processing"
                           and d, 60, what="ingestion")
        assert dataset["status"] == "ready", (dataset, service.logs())
        yield Teams(service=service, alpha=keys["alpha"], beta=keys["beta"], dataset_id=dataset_id)


def submit(teams: Teams, **overrides: Any) -> str:
    with teams.client() as client:
        response = client.post("/v1/jobs", json={"dataset_id": teams.dataset_id,
                                                 "hyperparameters": TINY_JOB | overrides})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def job(teams: Teams, job_id: str) -> dict[str, Any]:
    with teams.client() as client:
        body: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
    return body


def wait_status(teams: Teams, job_id: str, statuses: set[str], timeout: float = 180) -> dict[str, Any]:
    final: dict[str, Any] = wait_for(lambda: (j := job(teams, job_id))["status"] in statuses and j, timeout,
                                     interval=0.1, what=f"job {job_id} to reach {statuses}")
    return final


@contextmanager
def worker_busy(teams: Teams) -> Iterator[str]:
    """A long job holds the only worker, so jobs submitted meanwhile stay queued; it is cancelled on exit."""
    long_job = submit(teams, epochs=500)
    assert wait_status(teams, long_job, {"running", "failed", "succeeded"}, 60)["status"] == "running"
    try:
        yield long_job
    finally:
        with teams.client() as client:
            client.post(f"/v1/jobs/{long_job}/cancel")
        wait_status(teams, long_job, {"cancelled"}, 60)


@pytest.fixture(scope="module")
def finished(teams: Teams) -> dict[str, Any]:
    """A succeeded job of alpha's and its model's body."""
    final = wait_status(teams, submit(teams, **FINISHED_JOB), {"succeeded", "failed"})
    assert final["status"] == "succeeded", (final["error"], teams.service.logs())
    with teams.client() as client:
        model: dict[str, Any] = client.get(f"/v1/models/{final['model_id']}").json()
    return {"job": final, "model": model}


def png(response: httpx.Response) -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    image.load()
    assert image.format == "PNG"
    return image


def colours(image: Image.Image) -> int:
    return len(image.convert("RGB").getcolors(maxcolors=1 << 20) or [])


@contextmanager
def truncated_cache(teams: Teams) -> Iterator[None]:
    """The dataset's images.npy swapped for a copy cut in half, then back. Swapped by rename, never written in
    place: a running job's memory map keeps the file it opened."""
    images = Path(teams.service.env["TUNESERVE_DATA_DIR"]) / "datasets" / teams.dataset_id / "cache" / "images.npy"
    kept, cut = images.with_name("kept.npy"), images.with_name("cut.npy")
    content = images.read_bytes()
    cut.write_bytes(content[:len(content) // 2])
    os.link(images, kept)
    os.replace(cut, images)
    try:
        yield
    finally:
        os.replace(kept, images)


def test_training_error_fails_the_job_and_the_worker_takes_the_next(teams):
    with ExitStack() as restore:
        with worker_busy(teams):  # started on the whole cache, before it is cut
            restore.enter_context(truncated_cache(teams))
            broken = submit(teams)
            events = read_events(teams.service, broken, auth=teams.alpha)
            _, name, snapshot = next(events)  # connected while the worker is busy: the job is still queued
            assert (name, snapshot["status"]) == ("snapshot", "queued")
        rest = list(events)
    following = submit(teams)  # on the restored cache
    assert rest[-1][1:] == ("end", {"status": "failed"})
    changes = [(data["previous"], data["status"]) for _, name, data in rest if name == "state"]
    # The stream polls the row twice a second and misses a `running` this short (it usually does here); the row
    # says the job was claimed once (attempts 1, started_at) and never requeued.
    assert changes in ([("queued", "running"), ("running", "failed")], [("queued", "failed")]), changes
    final = job(teams, broken)
    assert (final["status"], final["error_code"], final["error"]) == ("failed", "training_error",
                                                                      TRUNCATED_CACHE_ERROR)
    assert (final["attempts"], final["model_id"], final["history"]) == (1, None, [])
    assert final["started_at"] is not None and final["finished_at"] is not None  # claimed (ran), then ended
    assert datetime.fromisoformat(final["started_at"]) <= datetime.fromisoformat(final["finished_at"])
    assert not (Path(teams.service.env["TUNESERVE_DATA_DIR"]) / "jobs" / broken).exists()
    after = wait_status(teams, following, {"succeeded", "failed"})
    assert (after["status"], after["attempts"]) == ("succeeded", 1), after["error"]
    [api, worker] = teams.service.processes
    assert worker.poll() is None and api.poll() is None


def test_finished_jobs_curves_are_a_png_of_its_epochs(teams, finished):
    with teams.client() as client:
        response = client.get(f"/v1/jobs/{finished['job']['id']}/plots/curves.png")
    image = png(response)
    assert response.headers["cache-control"] == "no-store"  # it changes while the job runs
    assert image.size == (900, 360) and colours(image) > 100
    assert [h["epoch"] for h in finished["job"]["history"]] == [1, 2]


def test_finished_models_confusion_matrix_is_a_png(teams, finished):
    with teams.client() as client:
        image = png(client.get(f"/v1/models/{finished['model']['id']}/plots/confusion.png"))
    assert image.size == (520, 400) and colours(image) > 100
    matrix = finished["model"]["metrics"]["test"]["confusion_matrix"]
    assert len(matrix) == 3 and sum(map(sum, matrix)) >= 9


def test_misclassified_thumbnails_are_served_byte_for_byte_as_the_model_lists_them(teams, finished):
    model_id = finished["model"]["id"]
    mistakes = finished["model"]["metrics"]["test"]["misclassified"]
    folder = Path(teams.service.env["TUNESERVE_DATA_DIR"]) / "models" / model_id / "misclassified"
    assert mistakes and sorted(p.name for p in folder.iterdir()) == sorted(m["image"] for m in mistakes)
    with teams.client() as client:
        for mistake in mistakes:
            response = client.get(f"/v1/models/{model_id}/misclassified/{mistake['image']}")
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] == "image/jpeg"
            assert response.content == (folder / mistake["image"]).read_bytes()
            assert Image.open(io.BytesIO(response.content)).size == (128, 128)
        unknown = client.get(f"/v1/models/{model_id}/misclassified/99-0.jpg")
    assert (unknown.status_code, unknown.json()["code"]) == (404, "image_not_found")


def test_another_teams_key_gets_404_as_if_nothing_existed(teams, finished):
    job_id, model_id = finished["job"]["id"], finished["model"]["id"]
    thumbnail = finished["model"]["metrics"]["test"]["misclassified"][0]["image"]
    with teams.client(teams.beta) as client:
        answers = [client.get(f"/v1/jobs/{job_id}/plots/curves.png"),
                   client.get(f"/v1/models/{model_id}/plots/confusion.png"),
                   client.get(f"/v1/models/{model_id}/misclassified/{thumbnail}")]
    assert [(a.status_code, a.json()["code"], a.json()["detail"]) for a in answers] == [
        (404, "job_not_found", f"job {job_id} does not exist"),
        (404, "model_not_found", f"model {model_id} does not exist"),
        (404, "model_not_found", f"model {model_id} does not exist")]


def test_unknown_ids_are_404(teams, finished):
    unknown = new_id()
    thumbnail = finished["model"]["metrics"]["test"]["misclassified"][0]["image"]
    with teams.client() as client:
        answers = [client.get(f"/v1/jobs/{unknown}/plots/curves.png"),
                   client.get(f"/v1/models/{unknown}/plots/confusion.png"),
                   client.get(f"/v1/models/{unknown}/misclassified/{thumbnail}"),
                   client.get("/v1/jobs/not-a-uuid/plots/curves.png")]
    assert [(a.status_code, a.json()["code"], a.json()["detail"]) for a in answers] == [
        (404, "job_not_found", f"job {unknown} does not exist"),
        (404, "model_not_found", f"model {unknown} does not exist"),
        (404, "model_not_found", f"model {unknown} does not exist"),
        (404, "job_not_found", "job not-a-uuid does not exist")]


def test_curves_of_unfinished_jobs_are_served_and_they_have_no_model(teams):
    """The code answers 200 (not 409) for a queued or running job: the plot shows what exists so far."""
    with worker_busy(teams) as running:
        queued = submit(teams)
        with teams.client() as client:
            for job_id, status in ((running, "running"), (queued, "queued")):
                image = png(client.get(f"/v1/jobs/{job_id}/plots/curves.png"))
                assert image.size == (900, 360) and colours(image) > 100
                assert (job(teams, job_id)["status"], job(teams, job_id)["model_id"]) == (status, None)
            assert client.post(f"/v1/jobs/{queued}/cancel").json()["status"] == "cancelled"
