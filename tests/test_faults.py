"""Fault tests with real processes: workers killed or stopped, brokers and databases down, API restarted.
Nothing may be lost or run twice."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.processes import REPO_ROOT, Service, wait_for
from tests.servers import PrivatePostgres, PrivateRedis
from tests.synthetic import make_zip

FAST_RECOVERY = {"TUNESERVE_HEARTBEAT_SECONDS": "0.5", "TUNESERVE_LEASE_TIMEOUT_SECONDS": "4",
                 "TUNESERVE_RECONCILE_INTERVAL_SECONDS": "0.5"}
# Slow enough per epoch (a few seconds on 2 cores) that a test can act between epochs.
# One pass per epoch: these tests time kills by epochs, and a small dataset would otherwise be passed over
# several times per epoch (min_steps_per_epoch).
SLOW_JOB = {"epochs": 3, "image_size": 64, "weights": "none", "batch_size": 16, "base_model": "resnet50",
            "min_steps_per_epoch": 1}
FAST_JOB = {"epochs": 1, "image_size": 32, "weights": "none", "batch_size": 16, "base_model": "resnet18",
            "min_steps_per_epoch": 1}


def ready_dataset(service: Service, tmp_path, per_class: int = 40) -> str:  # type: ignore[no-untyped-def]
    archive = make_zip(tmp_path / "d.zip", classes=["red", "green", "blue"], per_class=per_class)
    with service.client() as client:
        dataset_id = client.post("/v1/datasets", files={"file": ("d.zip", archive.read_bytes())}).json()["id"]
        wait_for(lambda: client.get(f"/v1/datasets/{dataset_id}").json()["status"] == "ready", 60, what="ingestion")
    return dataset_id


def job(service: Service, job_id: str) -> dict:
    return httpx.get(f"{service.url}/v1/jobs/{job_id}", timeout=30).json()


def submit(service: Service, dataset_id: str, hyperparameters: dict) -> str:
    response = httpx.post(f"{service.url}/v1/jobs", json={"dataset_id": dataset_id,
                                                          "hyperparameters": hyperparameters}, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait_status(service: Service, job_id: str, statuses: set[str], timeout: float) -> dict:
    return wait_for(lambda: (j := job(service, job_id))["status"] in statuses and j, timeout,
                    what=f"job to reach {statuses}")


def past_first_epoch(service: Service, tmp_path) -> str:  # type: ignore[no-untyped-def]
    """A slow job whose first epoch has just been recorded (two more to go)."""
    job_id = submit(service, ready_dataset(service, tmp_path), SLOW_JOB)
    wait_for(lambda: len(job(service, job_id)["history"]) >= 1, 120, interval=0.1, what="epoch 1")
    return job_id


@pytest.fixture
def service(migrated, start_service):  # type: ignore[no-untyped-def]
    env = {**migrated, **FAST_RECOVERY}
    return start_service(env)


@pytest.mark.slow
def test_kill_9_mid_training_resumes_on_a_new_worker_without_retraining(service, tmp_path):
    job_id = past_first_epoch(service, tmp_path)
    first_worker = service.processes[1]
    first_worker.send_signal(signal.SIGKILL)
    first_worker.wait()
    assert job(service, job_id)["status"] == "running"  # nobody has noticed yet: the lease is still fresh
    second_worker = service.start_worker("second")
    final = wait_status(service, job_id, {"succeeded", "failed"}, 300)
    assert final["status"] == "succeeded", final["error"]
    assert final["attempts"] == 2
    assert [h["epoch"] for h in final["history"]] == [1, 2, 3]
    second_log = (service.log_dir / f"second-{len(service.processes) - 1}.log").read_text()
    assert "finished epoch 1 " not in second_log
    assert "finished epoch 2 " in second_log and "finished epoch 3 " in second_log
    assert second_worker.poll() is None


@pytest.mark.slow
def test_sigterm_checkpoints_releases_the_job_and_exits_cleanly(service, tmp_path):
    job_id = past_first_epoch(service, tmp_path)
    worker = service.processes[1]
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0
    released = job(service, job_id)
    assert released["status"] == "queued" and released["attempts"] == 1
    service.start_worker("second")
    final = wait_status(service, job_id, {"succeeded", "failed"}, 300)
    assert final["status"] == "succeeded" and final["attempts"] == 2
    assert [h["epoch"] for h in final["history"]] == [1, 2, 3]


@pytest.mark.slow
def test_cancelling_a_running_job_stops_it_and_the_worker_takes_the_next(service, tmp_path):
    dataset_id = ready_dataset(service, tmp_path)
    long_job = submit(service, dataset_id, {**FAST_JOB, "epochs": 500})
    checkpoints = Path(service.env["TUNESERVE_DATA_DIR"]) / "jobs" / long_job
    wait_for(lambda: len(job(service, long_job)["history"]) >= 1 and checkpoints.exists(), 120, interval=0.1,
             what="a first epoch and its checkpoint")
    asked = time.monotonic()
    assert httpx.post(f"{service.url}/v1/jobs/{long_job}/cancel").json()["status"] == "cancelling"
    wait_status(service, long_job, {"cancelled"}, 10)
    assert time.monotonic() - asked < 10
    assert job(service, long_job)["model_id"] is None
    assert not checkpoints.exists()  # a cancelled job never resumes: its checkpoints go when it ends
    assert httpx.delete(f"{service.url}/v1/jobs/{long_job}").status_code == 204
    assert httpx.get(f"{service.url}/v1/jobs/{long_job}").status_code == 404
    next_job = submit(service, dataset_id, FAST_JOB)
    assert wait_status(service, next_job, {"succeeded", "failed"}, 120)["status"] == "succeeded"


@pytest.mark.slow
def test_job_submitted_while_redis_is_down_runs_once_redis_is_back(migrated, start_service, tmp_path):
    broker = PrivateRedis()
    broker.start()
    try:
        env = {**migrated, **FAST_RECOVERY, "TUNESERVE_BROKER_URL": broker.url}
        service = start_service(env)
        dataset_id = ready_dataset(service, tmp_path)
        broker.stop()
        started = time.monotonic()
        job_id = submit(service, dataset_id, FAST_JOB)
        assert time.monotonic() - started < 15
        assert job(service, job_id)["status"] == "queued"
        assert httpx.get(f"{service.url}/readyz").status_code == 503
        broker.start()
        final = wait_status(service, job_id, {"succeeded", "failed"}, 300)
        assert final["status"] == "succeeded" and final["attempts"] == 1
    finally:
        broker.stop()


def test_postgres_down_is_503_db_unavailable_and_recovers_without_restart(env_for, redis_url, start_service):
    database = PrivatePostgres()
    try:
        database.start()
        service = start_service(env_for(database.url, redis_url), workers=0)
        with service.client() as client:
            assert client.get("/v1/jobs").status_code == 200
            database.stop()
            down = client.get("/v1/jobs")
            assert down.status_code == 503 and down.headers["content-type"] == "application/problem+json"
            assert {key: down.json()[key] for key in ("detail", "code", "status")} == {
                "detail": "the database is unavailable; try again shortly", "code": "db_unavailable", "status": 503}
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith("unavailable")
            assert client.get("/healthz").status_code == 200
            database.start()
            assert wait_for(lambda: client.get("/v1/jobs").status_code == 200, 30, what="recovery")
            assert client.get("/readyz").status_code == 200
    finally:
        database.destroy()


@pytest.mark.slow
def test_api_restarted_mid_job_loses_nothing(service, tmp_path):
    job_id = submit(service, ready_dataset(service, tmp_path), {**FAST_JOB, "epochs": 3})
    wait_status(service, job_id, {"running"}, 60)
    api = service.processes[0]
    api.send_signal(signal.SIGKILL)
    api.wait()
    port = service.url.rsplit(":", 1)[1]
    log = (service.log_dir / "api-restarted.log").open("wb")
    service.processes.append(subprocess.Popen([sys.executable, "-m", "shared.cli", "api", "--port", port],
                                              env=service.env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT))
    final = wait_for(lambda: (j := _try_job(service, job_id)) and j["status"] in ("succeeded", "failed") and j,
                     300, what="job to finish after the API restart")
    assert final["status"] == "succeeded" and final["attempts"] == 1
    assert [h["epoch"] for h in final["history"]] == [1, 2, 3]


def _try_job(service: Service, job_id: str) -> dict | None:
    try:
        return job(service, job_id)
    except httpx.HTTPError:
        return None
