"""Webhooks through a live service: the worker's own sender threads deliver what real ingestion and
training produce, once per event id and hook, also across a worker killed with deliveries pending."""

import signal
import time

import httpx
import pytest

from tests.processes import Service, wait_for
from tests.synthetic import make_zip
from tests.webhook_receiver import Receiver, receiving

SECRET = "live-webhook-secret-0123"
TINY_JOB = {"base_model": "resnet18", "weights": "none", "epochs": 1, "image_size": 32, "batch_size": 8,
            "channels_last": False, "min_steps_per_epoch": 1}
LIVE = {"TUNESERVE_WEBHOOK_ALLOW_PRIVATE": "true", "TUNESERVE_WEBHOOK_BACKOFF_SECONDS": "0.5",
        "TUNESERVE_WEBHOOK_BACKOFF_MAX_SECONDS": "1", "TUNESERVE_WEBHOOK_POLL_SECONDS": "0.2",
        "TUNESERVE_HEARTBEAT_SECONDS": "0.5", "TUNESERVE_LEASE_TIMEOUT_SECONDS": "4",
        "TUNESERVE_RECONCILE_INTERVAL_SECONDS": "0.5"}


@pytest.fixture
def service(migrated, start_service) -> Service:
    return start_service({**migrated, **LIVE})


def upload(client: httpx.Client, tmp_path, name: str, classes: list[str]) -> str:
    archive = make_zip(tmp_path / f"{name}.zip", classes=classes, per_class=8, size=32)
    answer = client.post("/v1/datasets", files={"file": (f"{name}.zip", archive.read_bytes(), "application/zip")})
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def settled(client: httpx.Client, dataset_id: str) -> dict:
    return wait_for(lambda: (d := client.get(f"/v1/datasets/{dataset_id}").json())["status"] != "processing" and d,
                    90, what="ingestion")


def delivery_log(client: httpx.Client, hook_id: str) -> list[dict]:
    return client.get(f"/v1/webhooks/{hook_id}/deliveries").json()["data"]


def exactly_once(receiver: Receiver, expected: int) -> None:
    """Every accepted event id once, and nothing more arrives after a quiet spell."""
    time.sleep(2)
    accepted = receiver.accepted()
    assert len(accepted) == expected and set(accepted.values()) == {1}, accepted


def test_each_final_state_is_delivered_once_also_across_a_worker_killed_with_deliveries_pending(
        service: Service, tmp_path):
    # One service for both halves: starting one costs more than everything else here on a loaded machine.
    with receiving(SECRET, then=503) as receiver, service.client() as client:
        hook_id = client.post("/v1/webhooks", json={"url": receiver.url, "secret": SECRET}).json()["id"]
        good = upload(client, tmp_path, "good", ["red", "green"])
        bad = upload(client, tmp_path, "bad", ["blue"])  # one class: the dataset fails
        assert (settled(client, good)["status"], settled(client, bad)["status"]) == ("ready", "failed")
        wait_for(lambda: len(log := delivery_log(client, hook_id)) == 2 and all(d["attempts"] >= 1 for d in log),
                 30, what="both deliveries to fail at least once")
        worker = service.processes[1]
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        assert {d["status"] for d in delivery_log(client, hook_id)} == {"pending"}
        assert receiver.accepted() == {}
        receiver.then = 200  # the receiver is back
        service.start_worker("second")
        wait_for(lambda: [d["status"] for d in delivery_log(client, hook_id)] == ["delivered"] * 2, 60,
                 what="delivery by the new worker")
        exactly_once(receiver, 2)

        job = client.post("/v1/jobs", json={"dataset_id": good, "hyperparameters": TINY_JOB}).json()
        wait_for(lambda: receiver.types().get("job.succeeded"), 180, what="job.succeeded", interval=0.5)
        exactly_once(receiver, 3)
        assert receiver.types() == {"dataset.ready": 1, "dataset.failed": 1, "job.succeeded": 1}
        assert all(r.answered in (200, 503) for r in receiver.requests)  # none failed its signature check
        by_type = {r.payload["type"]: r.payload for r in receiver.requests if r.answered == 200}
        assert by_type["dataset.ready"]["data"]["id"] == good
        assert by_type["dataset.failed"]["data"]["error_code"] == "too_few_classes"
        finished = client.get(f"/v1/jobs/{job['id']}").json()
        assert finished["model_id"] is not None and by_type["job.succeeded"]["data"] == finished
        assert [d["status"] for d in delivery_log(client, hook_id)] == ["delivered"] * 3
