"""Fault tests with real processes: workers killed or stopped, brokers and databases down, API restarted.
Nothing may be lost or run twice."""

import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.live import read_events
from tests.processes import REPO_ROOT, Service, wait_for
from tests.servers import PrivatePostgres, PrivateRedis
from tests.synthetic import make_zip
from worker.training.engine import CHECKPOINT

FAST_RECOVERY = {"TUNESERVE_HEARTBEAT_SECONDS": "0.5", "TUNESERVE_LEASE_TIMEOUT_SECONDS": "4",
                 "TUNESERVE_RECONCILE_INTERVAL_SECONDS": "0.5"}
FAST_JOB = {"epochs": 1, "image_size": 32, "weights": "none", "batch_size": 16, "base_model": "resnet18",
            "min_steps_per_epoch": 1}
# Epochs of a step or two, so a test acts between epochs whatever the machine's speed, and far too many of them
# to finish before the test has killed, stopped or cancelled what it means to: each of these tests ends by
# cancelling it.
LONG_JOB = {**FAST_JOB, "epochs": 1000}
EPOCH_LOG = re.compile(r"job (\S+) finished epoch (\d+) on ")
RESUME_LOG = re.compile(r"job (\S+) resumes after epoch (\d+) on ")
# A Celery task ends with this line; the zombie has a single training task, run from before its pause.
ZOMBIE_DONE = re.compile(r"Task tuneserve\.train\[\S+\] succeeded in ")


def ready_dataset(service: Service, tmp_path) -> str:
    """Small: an epoch is one training step on a few images."""
    archive = make_zip(tmp_path / "d.zip", classes=["red", "green", "blue"], per_class=12, size=32)
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


def wait_epochs(service: Service, job_id: str, epochs: int, attempts: int = 1) -> dict:
    """The job once attempt ``attempts`` is running and ``epochs`` epochs are recorded."""
    return wait_for(lambda: (j := job(service, job_id))["attempts"] == attempts and len(j["history"]) >= epochs
                    and j, 120, interval=0.05, what=f"epoch {epochs} of attempt {attempts}")


def epochs_of(body: dict) -> list[int]:
    return [entry["epoch"] for entry in body["history"]]


def checkpoint_dir(service: Service, job_id: str) -> Path:
    return Path(service.env["TUNESERVE_DATA_DIR"]) / "jobs" / job_id


def checkpointed_epoch(service: Service, job_id: str) -> int:
    return int(torch.load(checkpoint_dir(service, job_id) / CHECKPOINT, weights_only=True)["epoch"])


def worker_log(service: Service, worker: subprocess.Popen) -> str:
    """Its log: Service.start_worker names it ``<name>-<index in service.processes>.log``."""
    index = service.processes.index(worker)
    return next(service.log_dir.glob(f"*-{index}.log")).read_text(errors="replace")


def logged(pattern: re.Pattern[str], log: str, job_id: str) -> list[int]:
    return [int(epoch) for owner, epoch in pattern.findall(log) if owner == job_id]


class StateStream:
    """The job's server-sent events read on a thread: its ``state`` and ``end`` events, in order."""

    def __init__(self, service: Service, job_id: str) -> None:
        self.events: queue.Queue[tuple[str, dict]] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(service, job_id), daemon=True)
        self._thread.start()

    def _read(self, service: Service, job_id: str) -> None:
        for _, name, data in read_events(service, job_id, timeout=120):
            if name in ("snapshot", "state", "end"):
                self.events.put((name, data))

    def next(self) -> tuple[str, dict]:
        return self.events.get(timeout=60)


def cancel_and_watch(service: Service, job_id: str, worker: subprocess.Popen) -> list[tuple[str, str, str]]:
    """Cancel a running job and return its state changes as the event stream reports them. The worker is paused
    while the cancel lands, so ``cancelling`` lasts until it is resumed: the stream sees every state."""
    stream = StateStream(service, job_id)
    name, snapshot = stream.next()
    assert (name, snapshot["status"]) == ("snapshot", "running")
    worker.send_signal(signal.SIGSTOP)
    try:
        response = httpx.post(f"{service.url}/v1/jobs/{job_id}/cancel", timeout=30)
        assert (response.status_code, response.json()["status"]) == (202, "cancelling")
        changes = [stream.next()]
    finally:
        worker.send_signal(signal.SIGCONT)
    changes += [stream.next(), stream.next()]
    return [(name, data.get("previous", ""), data["status"]) for name, data in changes]


CANCELLED_BY_ITS_WORKER = [("state", "running", "cancelling"), ("state", "cancelling", "cancelled"),
                           ("end", "", "cancelled")]


@pytest.fixture
def service(migrated, start_service):
    env = {**migrated, **FAST_RECOVERY}
    return start_service(env)


def signalled_after_two_epochs(service: Service, tmp_path: Path, signum: signal.Signals
                               ) -> tuple[str, subprocess.Popen[bytes]]:
    """A long job on the service's worker, which gets ``signum`` once two epochs are recorded."""
    job_id = submit(service, ready_dataset(service, tmp_path), LONG_JOB)
    wait_epochs(service, job_id, 2)
    worker: subprocess.Popen[bytes] = service.processes[1]
    worker.send_signal(signum)
    return job_id, worker


@pytest.mark.slow
def test_kill_9_mid_training_resumes_on_a_new_worker_after_its_last_checkpoint(service, tmp_path):
    job_id, first_worker = signalled_after_two_epochs(service, tmp_path, signal.SIGKILL)
    first_worker.wait()
    killed = job(service, job_id)
    recorded = len(killed["history"])
    assert (killed["status"], killed["attempts"]) == ("running", 1)  # no worker is left to notice the silence
    assert epochs_of(killed) == list(range(1, recorded + 1))
    # Its report waits for the next step, so the newest checkpoint may be one epoch past the history.
    saved = checkpointed_epoch(service, job_id)
    assert saved in (recorded, recorded + 1)
    second_worker = resumed_after_then_cancelled(service, job_id, saved)
    assert not checkpoint_dir(service, job_id).exists()
    assert second_worker.poll() is None


def resumed_after_then_cancelled(service: Service, job_id: str, saved: int) -> subprocess.Popen[bytes]:
    """A second worker resumes the job right after epoch ``saved`` (its log says so once), trains on with the
    history contiguous, and is cancelled: attempts 2, no model, every epoch after ``saved`` logged by it alone."""
    second_worker = service.start_worker("second")
    running = wait_epochs(service, job_id, saved + 2, attempts=2)
    assert epochs_of(running) == list(range(1, len(running["history"]) + 1))
    assert cancel_and_watch(service, job_id, second_worker) == CANCELLED_BY_ITS_WORKER
    final = job(service, job_id)
    last = len(final["history"])
    assert (final["attempts"], final["model_id"], epochs_of(final)) == (2, None, list(range(1, last + 1)))
    second_log = worker_log(service, second_worker)
    assert logged(RESUME_LOG, second_log, job_id) == [saved]
    assert logged(EPOCH_LOG, second_log, job_id) == list(range(saved + 1, last + 1))
    return second_worker


@pytest.mark.slow
def test_sigterm_checkpoints_releases_the_job_and_exits_cleanly(service, tmp_path):
    job_id, worker = signalled_after_two_epochs(service, tmp_path, signal.SIGTERM)
    assert worker.wait(timeout=60) == 0
    released = job(service, job_id)
    recorded = len(released["history"])
    assert (released["status"], released["attempts"]) == ("queued", 1)
    assert epochs_of(released) == list(range(1, recorded + 1))
    assert checkpointed_epoch(service, job_id) == recorded  # a clean stop reports what it saved
    resumed_after_then_cancelled(service, job_id, recorded)


@pytest.mark.slow
def test_cancelling_a_running_job_stops_it_and_the_worker_takes_the_next(service, tmp_path):
    dataset_id = ready_dataset(service, tmp_path)
    long_job = submit(service, dataset_id, LONG_JOB)
    wait_for(lambda: len(job(service, long_job)["history"]) >= 1 and checkpoint_dir(service, long_job).exists(),
             120, interval=0.05, what="a first epoch and its checkpoint")
    assert cancel_and_watch(service, long_job, service.processes[1]) == CANCELLED_BY_ITS_WORKER
    final = job(service, long_job)
    assert (final["attempts"], final["model_id"]) == (1, None)
    assert not checkpoint_dir(service, long_job).exists()  # a cancelled job never resumes: its checkpoints go
    assert httpx.post(f"{service.url}/v1/jobs/{long_job}/cancel").json()["code"] == "job_finished"
    assert httpx.delete(f"{service.url}/v1/jobs/{long_job}").status_code == 204
    assert httpx.get(f"{service.url}/v1/jobs/{long_job}").status_code == 404
    next_job = submit(service, dataset_id, FAST_JOB)
    assert wait_status(service, next_job, {"succeeded", "failed"}, 120)["status"] == "succeeded"


@pytest.mark.slow
def test_a_worker_paused_past_its_lease_writes_nothing_when_it_wakes(service, tmp_path):
    job_id, zombie = signalled_after_two_epochs(service, tmp_path, signal.SIGSTOP)
    try:
        paused = len(job(service, job_id)["history"])
        successor = service.start_worker("successor")
        # The successor's reaper requeues the silent job once its lease ends; the successor takes it and trains.
        running = wait_epochs(service, job_id, paused + 2, attempts=2)
        assert epochs_of(running) == list(range(1, len(running["history"]) + 1))
        assert cancel_and_watch(service, job_id, successor) == CANCELLED_BY_ITS_WORKER
        ended = job(service, job_id)
    finally:
        zombie.send_signal(signal.SIGCONT)
    # Its training task returns once it has noticed (from its clock or the database) that the lease is gone:
    # whatever it would wrongly write is written by then.
    zombie_log = wait_for(lambda: ZOMBIE_DONE.search(log := worker_log(service, zombie)) and log, 30,
                          what="the woken worker's task to end")
    after = job(service, job_id)
    assert (after["status"], after["attempts"], after["finished_at"]) == ("cancelled", 2, ended["finished_at"])
    assert after["history"] == ended["history"]
    assert epochs_of(after) == list(range(1, len(after["history"]) + 1))
    assert max(logged(EPOCH_LOG, str(zombie_log), job_id)) <= paused
    assert httpx.get(f"{service.url}/v1/models").json()["data"] == []
    data_dir = Path(service.env["TUNESERVE_DATA_DIR"])
    assert not (data_dir / "models").exists() or list((data_dir / "models").iterdir()) == []
    assert not checkpoint_dir(service, job_id).exists()
    assert zombie.poll() is None  # it stopped the job, not itself


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
