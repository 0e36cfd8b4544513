"""The tuneserve client verbs as subprocesses against a live API and Celery worker (Postgres + Redis)."""

import json
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
