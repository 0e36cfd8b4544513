"""The tuneserve client verbs as subprocesses against a live API and Celery worker (Postgres + Redis)."""

import re
import subprocess
import sys
import zipfile

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO_ROOT
from tests.live import CLASSES, serve
from tests.synthetic import make_heldout, make_zip

API_KEY = "cli-test-key-3"


def tuneserve(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    # Wide, plain output so tables and ids are not wrapped.
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**env, "COLUMNS": "200", "NO_COLOR": "1"})


@pytest.fixture(scope="module")
def service(pg_url, redis_url, tmp_path_factory):  # type: ignore[no-untyped-def]
    with serve(tmp_path_factory.mktemp("cli") / "data", pg_url, redis_url, TUNESERVE_API_KEYS=API_KEY) as service:
        yield service


def test_cli_uploads_a_folder_trains_with_progress_shows_status_and_predicts(service, tmp_path):
    folder = tmp_path / "colours"
    with zipfile.ZipFile(make_zip(tmp_path / "c.zip", classes=CLASSES, per_class=12, size=32)) as archive:
        for name in archive.namelist():  # our own generated zip: a folder of class sub-folders
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(archive.read(name))
    env = {**service.env, "TUNESERVE_URL": service.url, "TUNESERVE_API_KEY": API_KEY}

    upload = tuneserve("upload", str(folder), "--name", "colours", env=env)
    assert upload.returncode == 0, upload.stdout + upload.stderr
    dataset_id = re.search(r"dataset ([0-9a-f-]{36}) processing", upload.stdout)[1]
    assert re.findall(r"│ (\w+)\s+│\s+(\d+) │", upload.stdout) == [(c, "12") for c in sorted(CLASSES)]
    assert "36 images, 0 rejected" in upload.stdout

    train = tuneserve("train", dataset_id, "--epochs", "2", "--base-model", "resnet18", "--image-size", "32",
                      "--batch-size", "8", "--weights", "none", "-p", "channels_last=false", env=env)
    assert train.returncode == 0, train.stdout + train.stderr + service.logs()
    job_id = re.search(r"job ([0-9a-f-]{36}) queued", train.stdout)[1]
    progress = re.findall(r"progress\s+([\d.]+)% epoch (\d)/2 step (\d+)/(\d+)", train.stdout)
    assert progress and progress[-1][0] == "100.0" and progress[-1][1] == "2"
    assert [float(p[0]) for p in progress] == sorted(float(p[0]) for p in progress)
    assert re.findall(r"^epoch (\d) · train_loss", train.stdout, re.M) == ["1", "2"]
    assert re.search(r"^state running -> succeeded$", train.stdout, re.M)
    model_id = re.search(rf"job {job_id} succeeded · model ([0-9a-f-]{{36}}) · test accuracy", train.stdout)[1]

    status = tuneserve("--api-key", API_KEY, "status", job_id, env={**env, "TUNESERVE_API_KEY": ""})
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"job {job_id} succeeded" in status.stdout and f"model {model_id}" in status.stdout
    assert re.findall(r"│\s+(\d) │\s+[\d.]+ │", status.stdout) == ["1", "2"]

    images = []
    for i, (label, data) in enumerate(make_heldout(["red", "blue"], 1)):
        images.append(tmp_path / f"{i}-{label}.jpg")
        images[-1].write_bytes(data)
    predict = tuneserve("predict", *map(str, images), "--top-k", "2", env=env)
    assert predict.returncode == 0, predict.stdout + predict.stderr
    assert f"model {model_id}" in predict.stdout
    rows = re.findall(r"│ (\d-\w+\.jpg)\s+│ (\w+)\s+│ ([\d.]+) │ (\w+) ([\d.]+)\s+│", predict.stdout)
    assert [(r[0], r[1] in CLASSES, r[3] in CLASSES) for r in rows] == [
        ("0-red.jpg", True, True), ("1-blue.jpg", True, True)]

    with service.client(headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        metrics = client.get("/metrics").text
    counts = {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples}
    assert counts["tuneserve_predict_latency_seconds_count"] == 1
    assert counts["tuneserve_predict_batch_size_sum"] == 2  # both images went through the model, however batched


def test_cli_reports_api_errors_and_a_missing_key_in_one_line(service):
    env = {**service.env, "TUNESERVE_URL": service.url}

    no_key = tuneserve("status", "4b6c0b1e-0000-0000-0000-000000000000", env=env)
    unknown = tuneserve("--api-key", API_KEY, "train", "4b6c0b1e-0000-0000-0000-000000000000", env=env)
    nowhere = tuneserve("--url", "http://127.0.0.1:9", "status", "x", env=env)

    assert (no_key.returncode, no_key.stdout.strip()) == (
        1, "error: send 'Authorization: Bearer <key>' (missing_api_key)")
    assert (unknown.returncode, unknown.stdout.strip()) == (
        1, "error: dataset 4b6c0b1e-0000-0000-0000-000000000000 does not exist (dataset_not_found)")
    assert nowhere.returncode == 2 and nowhere.stdout.startswith("error: cannot reach http://127.0.0.1:9")
