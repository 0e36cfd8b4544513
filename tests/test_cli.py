"""The tuneserve client verbs as subprocesses against a live API and Celery worker (Postgres + Redis)."""

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.config import get_settings
from shared.storage import model_dir
from tests.live import CLASSES, serve
from tests.processes import REPO_ROOT
from tests.synthetic import make_heldout, make_zip

API_KEY = "cli-test-key-3"


def tuneserve(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    # Wide, plain output so tables and ids are not wrapped.
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**env, "COLUMNS": "200", "NO_COLOR": "1"})


@pytest.fixture(scope="module")
def service(pg_url, redis_url, tmp_path_factory):
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
    as_json = json.loads(tuneserve("jobs", "status", job_id, "--json", env=env).stdout)
    assert (as_json["id"], as_json["status"], as_json["model_id"]) == (job_id, "succeeded", model_id)
    assert [h["epoch"] for h in as_json["history"]] == [1, 2]

    images = []
    for i, (label, data) in enumerate(make_heldout(["red", "blue"], 1)):
        images.append(tmp_path / f"{i}-{label}.jpg")
        images[-1].write_bytes(data)
    predict = tuneserve("predict", *map(str, images), "--top-k", "2", env=env)
    assert predict.returncode == 0, predict.stdout + predict.stderr
    assert f"model {model_id}" in predict.stdout
    rows = re.findall(r"│ \S*/(\d-\w+\.jpg)\s+│ (\w+)\s+│ ([\d.]+) │ (\w+) ([\d.]+)\s+│", predict.stdout)
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


def test_cli_keys_create_list_revoke_in_the_database_and_a_revoked_key_gets_401(migrated, start_service):
    service = start_service({**migrated, "TUNESERVE_API_KEYS": API_KEY})
    env = migrated  # keys and projects talk to the database directly: no --url, no key

    made = tuneserve("projects", "create", "team-a", "--quota-mb", "100", "--description", "team A", env=env)
    again = tuneserve("projects", "create", "team-a", env=env)
    alice = tuneserve("keys", "create", "--name", "alice", "--role", "member", "--project", "team-a", "--json", env=env)
    ops = tuneserve("keys", "create", "--name", "ops", "--role", "admin", env=env)
    no_project = tuneserve("keys", "create", "--name", "bob", "--role", "member", env=env)
    unknown = tuneserve("keys", "create", "--name", "bob", "--project", "nowhere", env=env)
    assert made.returncode == 0 and "created project team-a (quota 100 MiB)" in made.stdout, made.stdout + made.stderr
    assert (again.returncode, again.stdout.strip()) == (1, "error: project 'team-a' already exists (project_exists)")
    assert alice.returncode == 0, alice.stdout + alice.stderr
    created = json.loads(alice.stdout)
    assert (created["name"], created["role"], created["projects"]) == ("alice", "member", ["team-a"])
    assert created["key"].startswith("ts_") and created["revoked_at"] is None
    ops_id = re.search(r"^id\s+(\S+)$", ops.stdout, re.M)[1]
    ops_key = re.search(r"^key\s+(ts_\S+)$", ops.stdout, re.M)[1]
    assert "shown only now" in ops.stdout
    assert no_project.returncode == 1 and "(projects_required)" in no_project.stdout
    assert unknown.returncode == 1 and "no such project: nowhere" in unknown.stdout

    listed = tuneserve("keys", "list", "--json", env=env)
    table = tuneserve("keys", "list", env=env)
    assert sorted((k["name"], k["role"], k["projects"]) for k in json.loads(listed.stdout)["data"]) == [
        ("alice", "member", ["team-a"]), ("ops", "admin", [])]
    assert created["key"] not in listed.stdout + table.stdout and ops_key not in listed.stdout + table.stdout
    assert created["id"] in table.stdout and ops_id in table.stdout

    with service.client() as client:
        as_alice = {"Authorization": f"Bearer {created['key']}"}
        seen = client.get("/v1/projects", headers=as_alice)
        assert [p["name"] for p in seen.json()["data"]] == ["team-a"], seen.text
        assert client.get("/v1/keys", headers=as_alice).status_code == 403
        assert client.get("/v1/keys", headers={"Authorization": f"Bearer {ops_key}"}).status_code == 200

        revoked = tuneserve("keys", "revoke", created["id"], env=env)
        assert revoked.returncode == 0 and f"revoked key {created['id']} 'alice'" in revoked.stdout, revoked.stdout
        after = client.get("/v1/projects", headers=as_alice)  # the very next request
        assert (after.status_code, after.json()["code"]) == (401, "invalid_api_key")
        assert client.get("/v1/projects", headers={"Authorization": f"Bearer {ops_key}"}).status_code == 200

    missing = tuneserve("keys", "revoke", "4b6c0b1e-0000-0000-0000-000000000000", env=env)
    active = json.loads(tuneserve("keys", "list", "--json", env=env).stdout)["data"]
    everything = json.loads(tuneserve("keys", "list", "--all", "--json", env=env).stdout)["data"]
    assert (missing.returncode, "(key_not_found)" in missing.stdout) == (1, True)
    assert [k["name"] for k in active] == ["ops"]
    assert {k["name"]: k["revoked_at"] is not None for k in everything} == {"alice": True, "ops": False}


def test_cli_project_option_and_env_reach_the_right_project(migrated, start_service, tmp_path):
    from tests.model_rows import publish_model
    from tests.project_rows import move_to_project

    service = start_service({**migrated, "TUNESERVE_API_KEYS": API_KEY})
    for name in ("team-a", "team-b"):
        assert tuneserve("projects", "create", name, env=migrated).returncode == 0
    model_a, model_b = publish_model(seed=1), publish_model(seed=2)
    move_to_project(model_a, "team-a")
    job_b, dataset_b = move_to_project(model_b, "team-b")
    env = {**migrated, "TUNESERVE_URL": service.url, "TUNESERVE_API_KEY": API_KEY}
    image = tmp_path / "red.jpg"
    image.write_bytes(make_heldout(["red"], 1)[0][1])

    by_flag = tuneserve("predict", str(image), "--project", "team-b", env=env)
    by_env = tuneserve("predict", str(image), env={**env, "TUNESERVE_PROJECT": "team-a"})
    flag_wins = tuneserve("predict", str(image), "--project", "team-b", env={**env, "TUNESERVE_PROJECT": "team-a"})
    nothing = tuneserve("predict", str(image), env=env)  # 'default' has no model
    assert f"model {model_b}" in by_flag.stdout, by_flag.stdout + by_flag.stderr
    assert f"model {model_a}" in by_env.stdout, by_env.stdout + by_env.stderr
    assert f"model {model_b}" in flag_wins.stdout
    assert nothing.returncode == 1 and "project 'default' has no trained model yet" in nothing.stdout

    archive = make_zip(tmp_path / "c.zip", classes=CLASSES, per_class=6, size=32)
    upload = tuneserve("upload", str(archive), "--no-wait", env={**env, "TUNESERVE_PROJECT": "team-b"})
    assert upload.returncode == 0, upload.stdout + upload.stderr
    dataset_id = re.search(r"dataset ([0-9a-f-]{36}) processing in project team-b", upload.stdout)[1]
    with service.client(headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        assert client.get(f"/v1/datasets/{dataset_id}").json()["project"] == "team-b"
        listed = client.get("/v1/datasets", params={"project": "team-b"}).json()["data"]
    assert sorted(d["id"] for d in listed) == sorted([dataset_id, dataset_b])

    jobs = tuneserve("status", "--project", "team-b", env=env)
    wrong_job = tuneserve("status", job_b, "--project", "team-a", env=env)
    wrong_dataset = tuneserve("train", dataset_b, "--project", "team-a", env=env)
    assert jobs.returncode == 0 and "project team-b: 1 job(s)" in jobs.stdout and job_b in jobs.stdout, jobs.stdout
    assert wrong_job.returncode == 1 and f"job {job_b} is in project 'team-b', not 'team-a'" in wrong_job.stdout
    assert wrong_dataset.returncode == 1 and "is in project 'team-b', not 'team-a'" in wrong_dataset.stdout


def json_of(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_cli_groups_answer_json_predict_folders_in_batches_run_batches_and_manage_webhooks(migrated, start_service,
                                                                                           tmp_path):
    from tests.model_rows import publish_model

    service = start_service({**migrated, "TUNESERVE_API_KEYS": API_KEY})
    older, newer = publish_model(seed=1, age_s=60), publish_model(seed=2)
    env = {**migrated, "TUNESERVE_URL": service.url, "TUNESERVE_API_KEY": API_KEY}
    folder = tmp_path / "photos"
    (folder / "b" / "c").mkdir(parents=True)
    paths = [folder / "1.jpg", folder / "b" / "2.png", folder / "b" / "c" / "3.jpg", folder / "b" / "c" / "4.jpg",
             folder / "b" / "5.jpeg"]
    for i, path in enumerate(paths):
        path.write_bytes(make_heldout(["red"], 1, seed=i)[0][1])
    (folder / "notes.txt").write_text("not an image")

    version = tuneserve("--version", env=env)
    assert (version.returncode, version.stdout.strip()) == (0, "tuneserve 0.1.0")
    listed = json_of(tuneserve("models", "list", "--json", env=env))
    assert (listed["count"], [m["id"] for m in listed["data"]]) == (2, [newer, older])
    assert json_of(tuneserve("models", "promote", older, "--json", env=env))["pinned"] is True
    shown = json_of(tuneserve("models", "show", older, "--json", env=env))
    assert (shown["serving"], shown["temperature"], shown["min_score"]) == (True, 1.0, 0.0)

    answered = json_of(tuneserve("predict", str(folder), "--batch", "2", "--json", env=env))["predictions"]
    assert [r["path"] for r in answered] == sorted(map(str, paths))  # recursive, images only, in order
    assert {r["model_id"] for r in answered} == {older}
    assert [len(r["top"]) for r in answered] == [3] * 5  # the API's top_k (5), clamped to 3 classes
    assert all(r["label"] == r["top"][0]["label"] for r in answered)
    with service.client(headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        metrics = client.get("/metrics").text
    counts = {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples}
    assert counts["tuneserve_predict_latency_seconds_count"] == 3  # 2 + 2 + 1 images

    threshold = json_of(tuneserve("models", "threshold", older, "--min-score", "0.99", "--class", "red=0.995",
                                  "--json", env=env))
    assert (threshold["min_score"], threshold["class_min_scores"]) == (0.99, {"red": 0.995})
    abstained = tuneserve("predict", str(paths[0]), env=env)
    assert abstained.returncode == 0 and re.search(r"│ \S+1\.jpg\s+│ abstains\s+│", abstained.stdout), abstained.stdout
    strict = json_of(tuneserve("predict", str(paths[0]), "--min-score", "0.1", "--top-k", "1", "--json", env=env))
    assert strict["predictions"][0]["label"] is None and len(strict["predictions"][0]["top"]) == 1
    bad = tuneserve("predict", str(paths[0]), "--min-score", "2", "--json", env=env)
    assert bad.returncode == 1 and json.loads(bad.stdout)["code"] == "validation_error"
    wrong_class = tuneserve("models", "threshold", older, "--class", "purple=0.5", env=env)
    assert wrong_class.returncode == 1 and "(unknown_class)" in wrong_class.stdout

    exported = json_of(tuneserve("models", "export", older, "-o", str(tmp_path), "--json", env=env))
    on_disk = model_dir(get_settings(), older) / "model.safetensors"
    assert exported["path"] == str(tmp_path / f"{older}.safetensors")
    assert Path(exported["path"]).read_bytes() == on_disk.read_bytes()

    jobs = json_of(tuneserve("jobs", "list", "--json", env=env))
    datasets = json_of(tuneserve("datasets", "list", "--json", env=env))
    assert (jobs["count"], datasets["count"]) == (2, 2)
    final = tuneserve("jobs", "cancel", jobs["data"][0]["id"], "--json", env=env)
    assert final.returncode == 1 and json.loads(final.stdout)["status"] == 409
    missing = tuneserve("models", "show", "4b6c0b1e-0000-0000-0000-000000000000", env=env)
    assert (missing.returncode, missing.stdout.strip()) == (
        1, "error: model 4b6c0b1e-0000-0000-0000-000000000000 does not exist (model_not_found)")

    # Batch predictions on the worker, and webhooks: the same service, to keep this module fast.
    model_id = older
    folder = tmp_path / "batch"
    folder.mkdir()
    for i, (label, data) in enumerate(make_heldout(CLASSES, 1)):
        (folder / f"{i}-{label}.jpg").write_bytes(data)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")

    batch = json_of(tuneserve("batch", "create", str(folder), "--top-k", "2", "--wait", "--json", env=env))
    assert (batch["status"], batch["model_id"], batch["top_k"]) == ("succeeded", model_id, 2), service.logs()
    assert (batch["progress"]["done"], batch["progress"]["rejected"]) == (4, 1)
    assert json_of(tuneserve("batch", "status", batch["id"], "--json", env=env))["status"] == "succeeded"
    assert [b["id"] for b in json_of(tuneserve("batch", "list", "--json", env=env))["data"]] == [batch["id"]]
    results = json_of(tuneserve("batch", "results", batch["id"], "-o", str(tmp_path / "out.jsonl"), "--format",
                                "jsonl", "--json", env=env))
    rows = [json.loads(line) for line in Path(results["path"]).read_text().splitlines()]
    assert sorted(r["filename"] for r in rows) == sorted(p.name for p in folder.iterdir())
    csv_text = tuneserve("batch", "results", batch["id"], "-o", str(tmp_path), env=env)
    assert csv_text.returncode == 0 and (tmp_path / f"batch-{batch['id']}.csv").is_file(), csv_text.stdout

    hook = json_of(tuneserve("webhooks", "create", "https://hooks.example.com/t", "--secret", "s3cret-0123456789abcdef",
                             "--event", "job.succeeded", "--json", env=env))
    assert (hook["url"], hook["events"]) == ("https://hooks.example.com/t", ["job.succeeded"]) and "secret" not in hook
    assert [h["id"] for h in json_of(tuneserve("webhooks", "list", "--json", env=env))["data"]] == [hook["id"]]
    assert json_of(tuneserve("webhooks", "deliveries", hook["id"], "--json", env=env)) == {"data": [], "count": 0}
    assert json_of(tuneserve("webhooks", "delete", hook["id"], "--json", env=env)) == {"id": hook["id"],
                                                                                       "deleted": True}
    assert json_of(tuneserve("webhooks", "list", "--json", env=env))["count"] == 0
