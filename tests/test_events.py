"""GET /v1/jobs/{id}/events against a live API and Celery worker on Postgres + Redis."""

from typing import Any

import pytest

from tests.live import read_events, ready_dataset, serve, start_job

LEGAL_NEXT = {"queued": {"running", "cancelled", "failed", "succeeded"},
              "running": {"succeeded", "failed", "cancelling", "queued"}, "cancelling": {"cancelled", "failed"}}


@pytest.fixture(scope="module")
def streamed(pg_url, redis_url, tmp_path_factory) -> Any:
    """A service, a tiny job, and every event of that job's stream read from the moment it was queued."""
    tmp = tmp_path_factory.mktemp("events")
    with serve(tmp / "data", pg_url, redis_url) as service:
        job = start_job(service, ready_dataset(service, tmp)["id"])
        yield service, job, list(read_events(service, job["id"]))


def test_events_arrive_in_order_and_the_stream_ends_at_the_final_state(streamed):
    _, job, events = streamed
    names = [name for _, name, _ in events]

    assert [event_id for event_id, _, _ in events] == list(range(len(events)))
    assert names[0] == "snapshot" and events[0][2]["id"] == job["id"]
    assert names[-1] == "end" and events[-1][2] == {"status": "succeeded"}
    epochs = [m["epoch"] for m in events[0][2]["history"]] + [d["epoch"] for _, n, d in events if n == "epoch"]
    assert epochs == [1, 2]
    assert all(d["metrics"]["epoch"] == d["epoch"] for _, n, d in events if n == "epoch")
    state_events = [d for _, n, d in events if n == "state"]
    states = [events[0][2]["status"]] + [d["status"] for d in state_events]
    assert states[-1] == "succeeded"
    assert all(b in LEGAL_NEXT[a] for a, b in zip(states, states[1:], strict=False)), states
    assert [d["previous"] for d in state_events] == states[:-1]
    done = [d["epoch"] * 100_000 + d["step"] for _, n, d in events if n == "progress"]
    assert done and done == sorted(done)
    # Every epoch is told before the state change that ends the job, and that change names the model.
    final_at = next(i for i, (_, n, d) in enumerate(events) if n == "state" and d["status"] == "succeeded")
    assert all(i < final_at for i, n in enumerate(names) if n == "epoch")
    assert events[final_at][2]["model_id"] and events[final_at][2]["metrics"]["epochs_run"] == 2


def test_a_reconnect_gets_a_full_snapshot_with_ids_after_last_event_id(streamed):
    service, job, first = streamed
    last_id = first[-1][0]

    again = list(read_events(service, job["id"], last_event_id=str(last_id)))

    assert [(i, n) for i, n, _ in again] == [(last_id + 1, "snapshot"), (last_id + 2, "end")]
    snapshot = again[0][2]
    assert snapshot["status"] == "succeeded"
    assert [h["epoch"] for h in snapshot["history"]] == [1, 2]
    assert snapshot["model_id"] == next(d for _, n, d in first if n == "state" and d["status"] == "succeeded")[
        "model_id"]


def test_events_for_an_unknown_job_are_a_404_before_any_stream(streamed):
    service, _, _ = streamed
    with service.client() as client:
        response = client.get("/v1/jobs/00000000-0000-0000-0000-000000000000/events")
    assert response.status_code == 404
    body = response.json()  # a problem (RFC 9457): detail and code as everywhere, plus type/title/status/instance
    assert (body["detail"], body["code"], body["status"]) == (
        "job 00000000-0000-0000-0000-000000000000 does not exist", "job_not_found", 404)
