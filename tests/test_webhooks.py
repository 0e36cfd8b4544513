"""Webhooks against real Postgres: the routes, the outbox rows a final state writes, and delivery to a
receiver on loopback driven in-process (the live worker is in test_webhooks_live.py)."""

import functools
import json
import time
from collections.abc import Callable
from typing import get_args

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, func, select, text, update

from api.schemas import BatchPredictionPublic, DatasetPublic, JobPublic
from api.services import jobs as job_service
from shared import batchstate
from shared.config import get_settings
from shared.db import session_scope
from shared.jobstate import JobStatus, transition
from shared.orm import BatchPrediction, Dataset, Job, JobEpoch, Webhook, WebhookDelivery, WebhookEvent, new_id
from shared.webhooks import EVENT_TYPES, WebhookEventType, batch_body, dataset_body, job_body
from tests.helpers import job_row, project_row, ready_dataset, run_in_threads
from tests.processes import wait_for
from tests.webhook_receiver import receiving, verify
from worker.webhooks import Refused, claim, deliver_due, finish, prune, resolve

SECRET = "s3cret-for-tests-0123"
FAST = {"TUNESERVE_WEBHOOK_ALLOW_PRIVATE": "true", "TUNESERVE_WEBHOOK_BACKOFF_SECONDS": "0.05",
        "TUNESERVE_WEBHOOK_BACKOFF_MAX_SECONDS": "0.1", "TUNESERVE_WEBHOOK_TIMEOUT_SECONDS": "3"}


def hook(client: TestClient, url: str, **body: object) -> dict:
    answer = client.post("/v1/webhooks", json={"url": url, "secret": SECRET, **body})
    assert answer.status_code == 201, answer.text
    assert answer.headers["location"].endswith(f"/v1/webhooks/{answer.json()['id']}")  # GET answers there
    return answer.json()


def cancel_queued_job(project: str = "default") -> str:
    """A job that reaches a final state (cancelled) through the one transition function."""
    job_id = job_row(ready_dataset(project=project), project=project)
    with session_scope() as session:
        assert transition(session=session, job_id=job_id, expected=JobStatus.queued, to=JobStatus.cancelled)
    return job_id


def deliveries(client: TestClient, hook_id: str) -> list[dict]:
    answer = client.get(f"/v1/webhooks/{hook_id}/deliveries")
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def test_create_list_delete_never_show_the_secret_and_never_fetch_the_url(make_app: Callable[..., TestClient]):
    with receiving(SECRET) as receiver, make_app() as client:
        created = hook(client, receiver.url)
        assert set(created) == {"id", "project", "url", "events", "created_at"}
        assert (created["project"], created["url"], created["events"]) == ("default", receiver.url, list(EVENT_TYPES))
        assert client.get(f"/v1/webhooks/{created['id']}").json() == created
        listed = client.get("/v1/webhooks").json()
        assert listed == {"data": [created], "count": 1}
        assert SECRET not in client.get("/v1/webhooks").text
        with session_scope() as session:  # kept as given: deliveries are signed with it
            assert session.scalar(select(Webhook.secret)) == SECRET
        assert receiver.requests == []
        assert client.delete(f"/v1/webhooks/{created['id']}").status_code == 204
        for again in (client.delete(f"/v1/webhooks/{created['id']}"), client.get(f"/v1/webhooks/{created['id']}")):
            assert (again.status_code, again.json()["code"]) == (404, "webhook_not_found")
        assert client.get("/v1/webhooks").json() == {"data": [], "count": 0}


def test_events_default_to_all_and_can_be_chosen(make_app: Callable[..., TestClient]):
    with make_app() as client:
        chosen = hook(client, "https://example.com/h", events=["job.failed", "dataset.ready", "job.failed"])
        assert chosen["events"] == ["dataset.ready", "job.failed"]
        assert list(get_args(WebhookEventType)) == list(EVENT_TYPES)


@pytest.mark.parametrize(("body", "code"), [
    ({"url": "ftp://example.com/h"}, "invalid_webhook_url"),
    ({"url": "javascript:alert(1)"}, "invalid_webhook_url"),
    ({"url": "file:///etc/passwd"}, "invalid_webhook_url"),
    ({"url": "http://"}, "invalid_webhook_url"),
    ({"url": "https:///path-only"}, "invalid_webhook_url"),
    ({"url": "http://example.com:99999/h"}, "invalid_webhook_url"),
    ({"url": "http://exa mple.com/h"}, "invalid_webhook_url"),
    ({"url": "https://example.com/" + "a" * 2048}, "validation_error"),
    ({"url": "https://example.com/h", "secret": "too-short"}, "validation_error"),
    ({"url": "https://example.com/h", "events": ["job.exploded"]}, "validation_error"),
    ({"url": "https://example.com/h", "events": []}, "validation_error"),
    ({"url": "https://example.com/h", "verify": False}, "validation_error"),
    ({"url": "https://example.com/h", "project": "nope"}, "project_not_found"),
], ids=lambda v: v if isinstance(v, str) else json.dumps(v)[:60])
def test_bad_webhook_requests_are_refused_and_create_nothing(make_app, body, code):
    with make_app() as client:
        answer = client.post("/v1/webhooks", json={"secret": SECRET, **body})
        assert (answer.status_code, answer.json()["code"]) == (404 if code == "project_not_found" else 422, code)
        assert answer.json()["detail"]
        assert client.get("/v1/webhooks").json()["count"] == 0


def test_a_project_holds_at_most_the_configured_number_of_hooks(make_app: Callable[..., TestClient]):
    with make_app(TUNESERVE_WEBHOOK_MAX_PER_PROJECT="2") as client:
        project_row("other")
        for n in range(2):
            hook(client, f"https://example.com/{n}")
        refused = client.post("/v1/webhooks", json={"url": "https://example.com/3", "secret": SECRET})
        assert (refused.status_code, refused.json()["code"]) == (409, "too_many_webhooks")
        assert "2" in refused.json()["detail"]
        assert client.get("/v1/webhooks?project=default").json()["count"] == 2
        assert hook(client, "https://example.com/o", project="other")["project"] == "other"


def test_project_in_the_url_and_the_body_must_agree(make_app: Callable[..., TestClient]):
    with make_app() as client:
        project_row("other")
        answer = client.post("/v1/webhooks?project=other", json={"url": "https://e.com/h", "secret": SECRET,
                                                                 "project": "default"})
        assert (answer.status_code, answer.json()["code"]) == (422, "validation_error")
        assert client.post("/v1/webhooks?project=other", json={"url": "https://e.com/h", "secret": SECRET}
                           ).json()["project"] == "other"


def test_event_data_is_the_public_body_the_api_answers_with(make_app: Callable[..., TestClient]):
    with make_app() as client:
        job_id = job_row(ready_dataset())
        with session_scope() as session:
            session.add(JobEpoch(job_id=job_id, epoch=1, metrics={"epoch": 1, "val_accuracy": 0.5}))
            session.execute(update(Job).where(Job.id == job_id).values(progress={"epoch": 1, "x": 2}))
        with session_scope() as session:
            job = session.get_one(Job, job_id)
            history = job_service.history(session=session, job_id=job_id)
            api_job = JobPublic.from_row(job, history).model_dump(mode="json")
            assert _json(job_body(session, job_id)) == api_job
            dataset = session.get_one(Dataset, job.dataset_id)
            assert _json(dataset_body(session, dataset.id)) == DatasetPublic.model_validate(dataset).model_dump(
                mode="json")
        assert client.get(f"/v1/jobs/{job_id}").json() == api_job


def _json(body: dict) -> dict:
    from pydantic import TypeAdapter

    return TypeAdapter(dict).dump_python(body, mode="json")


def test_a_final_state_writes_one_event_for_each_hook_that_wants_it(make_app: Callable[..., TestClient]):
    with make_app() as client:
        project_row("other")
        everything = hook(client, "https://example.com/all")
        failures_only = hook(client, "https://example.com/failed", events=["job.failed"])
        hook(client, "https://example.com/other", project="other")
        job_id = cancel_queued_job()
        with session_scope() as session:
            events = session.execute(select(WebhookEvent.id, WebhookEvent.type, WebhookEvent.resource_id)).all()
            assert [(t, r) for _, t, r in events] == [("job.cancelled", job_id)]
            hooks = session.scalars(select(WebhookDelivery.hook_id)).all()
        assert hooks == [everything["id"]]
        assert deliveries(client, failures_only["id"]) == []
        [logged] = deliveries(client, everything["id"])
        assert (logged["event_id"], logged["type"], logged["status"], logged["attempts"]) == (
            events[0][0], "job.cancelled", "pending", 0)


def running_batch() -> str:
    with session_scope() as session:
        batch = BatchPrediction(id=new_id(), project="default", status="running", source="dataset",
                                dataset_id=ready_dataset(), model_id=new_id(), top_k=3, total=4, done=4, rejected=1)
        session.add(batch)
        return batch.id


def test_batches_that_succeed_or_fail_are_events_with_their_public_body(make_app: Callable[..., TestClient]):
    with make_app() as client:
        hook(client, "https://example.com/all")
        finished = {}
        for to in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelling):
            finished[to] = running_batch()
            with session_scope() as session:
                assert batchstate.transition(session=session, batch_id=finished[to], expected=JobStatus.running, to=to)
        with session_scope() as session:
            cancelled = finished[JobStatus.cancelling]
            assert batchstate.transition(session=session, batch_id=cancelled, expected=JobStatus.cancelling,
                                         to=JobStatus.cancelled)
        with session_scope() as session:
            events = {r: json.loads(b) for r, b in session.execute(select(WebhookEvent.resource_id, WebhookEvent.body))}
            assert {r: e["type"] for r, e in events.items()} == {finished[JobStatus.succeeded]: "batch.succeeded",
                                                                finished[JobStatus.failed]: "batch.failed"}
            batch_id = finished[JobStatus.succeeded]
            row = session.get(BatchPrediction, batch_id)
            public = BatchPredictionPublic.model_validate(row).model_dump(mode="json")
            assert _json(batch_body(session, batch_id)) == public == events[batch_id]["data"]
            assert public["progress"] == {"total": 4, "done": 4, "rejected": 1}


def test_a_transition_that_rolls_back_leaves_no_event(make_app: Callable[..., TestClient]):
    with make_app() as client:
        hook(client, "https://example.com/all")
        job_id = job_row(ready_dataset())
        with pytest.raises(RuntimeError), session_scope() as session:
            assert transition(session=session, job_id=job_id, expected=JobStatus.queued, to=JobStatus.cancelled)
            raise RuntimeError("the caller failed before its commit")
        with session_scope() as session:
            assert session.scalar(select(Job.status).where(Job.id == job_id)) == "queued"
            assert session.scalar(select(func.count()).select_from(WebhookEvent)) == 0
            assert session.scalar(select(func.count()).select_from(WebhookDelivery)) == 0


def test_a_delivery_is_signed_sent_once_and_logged(make_app: Callable[..., TestClient]):
    with receiving(SECRET) as receiver, make_app(**FAST) as client:
        created = hook(client, receiver.url)
        job_id = cancel_queued_job()
        assert deliver_due(settings=get_settings()) == 1
        assert deliver_due(settings=get_settings()) == 0  # delivered: never sent again
        [got] = receiver.requests
        assert got.answered == 200
        payload = got.payload
        assert (payload["type"], payload["data"]["id"], payload["data"]["status"]) == ("job.cancelled", job_id,
                                                                                      "cancelled")
        assert payload["id"] == got.event_id and set(payload) == {"id", "type", "created_at", "data"}
        assert payload["data"] == client.get(f"/v1/jobs/{job_id}").json()
        [logged] = deliveries(client, created["id"])
        assert (logged["status"], logged["attempts"], logged["last_status_code"], logged["last_error"]) == (
            "delivered", 1, 200, None)
        assert logged["delivered_at"] is not None and logged["next_attempt_at"] is None


def test_the_signature_fails_with_a_wrong_secret_or_a_changed_body(make_app: Callable[..., TestClient]):
    # Default back-off: the refused delivery is not due again during this test.
    with receiving("the-receivers-own-wrong-secret") as receiver, make_app(TUNESERVE_WEBHOOK_ALLOW_PRIVATE="true") \
            as client:
        created = hook(client, receiver.url)
        cancel_queued_job()
        deliver_due(settings=get_settings())
        [got] = receiver.requests
        assert got.answered == 401  # the receiver's secret is not the hook's
        assert verify(secret=SECRET, signature=got.signature, body=got.body)
        assert not verify(secret="the-receivers-own-wrong-secret", signature=got.signature, body=got.body)
        assert not verify(secret=SECRET, signature=got.signature, body=got.body.replace(b"cancelled", b"succeeded"))
        assert not verify(secret=SECRET, signature=got.signature, body=got.body, now=time.time() + 3600)
        [logged] = deliveries(client, created["id"])
        assert (logged["status"], logged["last_status_code"]) == ("pending", 401)
        assert logged["last_error"] == "the receiver answered HTTP 401"


def test_a_receiver_that_fails_twice_gets_it_on_the_third_attempt(make_app: Callable[..., TestClient]):
    with receiving(SECRET, script=[500, 500]) as receiver, make_app(**FAST) as client:
        created = hook(client, receiver.url)
        cancel_queued_job()
        wait_for(lambda: deliver_due(settings=get_settings()) >= 0 and receiver.accepted(), 30, interval=0.05,
                 what="the third attempt")
        assert [r.answered for r in receiver.requests] == [500, 500, 200]
        assert len(set(r.event_id for r in receiver.requests)) == 1
        [logged] = deliveries(client, created["id"])
        assert (logged["status"], logged["attempts"], logged["last_status_code"]) == ("delivered", 3, 200)


def test_a_delivery_gives_up_after_the_configured_attempts(make_app: Callable[..., TestClient]):
    with receiving(SECRET, then=500) as receiver, make_app(**FAST, TUNESERVE_WEBHOOK_MAX_ATTEMPTS="2") as client:
        created = hook(client, receiver.url)
        cancel_queued_job()
        wait_for(lambda: deliver_due(settings=get_settings()) >= 0 and
                 deliveries(client, created["id"])[0]["status"] == "failed", 30, interval=0.05, what="giving up")
        time.sleep(0.3)
        deliver_due(settings=get_settings())
        assert [r.answered for r in receiver.requests] == [500, 500]
        [logged] = deliveries(client, created["id"])
        assert (logged["attempts"], logged["last_status_code"], logged["next_attempt_at"]) == (2, 500, None)
        assert client.get(f"/v1/webhooks/{created['id']}/deliveries?status=failed").json()["count"] == 1
        assert client.get(f"/v1/webhooks/{created['id']}/deliveries?status=delivered").json()["count"] == 0


def test_loopback_and_private_targets_are_refused_unless_allowed(make_app: Callable[..., TestClient]):
    with receiving(SECRET) as receiver, make_app(TUNESERVE_WEBHOOK_ALLOW_PRIVATE="false") as client:
        created = hook(client, receiver.url)
        cancel_queued_job()
        assert deliver_due(settings=get_settings()) == 1
        assert receiver.requests == []
        [logged] = deliveries(client, created["id"])
        assert (logged["status"], logged["attempts"], logged["last_status_code"]) == ("pending", 1, None)
        assert "127.0.0.1" in logged["last_error"] and "TUNESERVE_WEBHOOK_ALLOW_PRIVATE" in logged["last_error"]


def test_concurrent_senders_deliver_each_event_exactly_once(make_app: Callable[..., TestClient]):
    with receiving(SECRET) as receiver, make_app(**FAST) as client:
        hook(client, receiver.url)
        hook(client, receiver.url + "?second")
        for _ in range(10):
            cancel_queued_job()
        settings = get_settings()
        sent = run_in_threads([functools.partial(deliver_due, settings=settings)] * 6)
        assert sum(sent) == 20
        assert len(receiver.requests) == 20  # 10 events x 2 hooks, none twice
        assert set(receiver.accepted().values()) == {2}  # each event id: once per hook
        with session_scope() as session:
            statuses = session.execute(select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status))
            assert dict(statuses.all()) == {"delivered": 20}


def test_a_sender_that_died_holding_a_delivery_loses_it_when_its_lease_expires(make_app: Callable[..., TestClient]):
    with receiving(SECRET) as receiver, make_app(**FAST) as client:
        created = hook(client, receiver.url)
        cancel_queued_job()
        settings = get_settings()
        dead = claim(settings=settings)  # a sender that claimed the delivery, then was SIGKILLed
        assert dead is not None
        assert deliver_due(settings=settings) == 0  # held: nobody else sends it meanwhile
        with session_scope() as session:
            session.execute(update(WebhookDelivery).values(lease_until=func.now() - text("interval '1 s'")))
        assert deliver_due(settings=settings) == 1
        # The dead sender's late answer (its process was only frozen) cannot undo the recorded delivery.
        assert finish(claimed=dead, status_code=500, error="late", settings=settings) is None
        [logged] = deliveries(client, created["id"])
        assert (logged["status"], logged["attempts"], logged["last_status_code"]) == ("delivered", 1, 200)
        assert list(receiver.accepted().values()) == [1]


def test_old_events_go_once_none_of_their_deliveries_is_pending(make_app: Callable[..., TestClient]):
    with make_app(TUNESERVE_WEBHOOK_RETENTION_DAYS="1") as client:
        created = hook(client, "https://example.com/h")
        old_done, old_pending, recent_done = (cancel_queued_job() for _ in range(3))
        with session_scope() as session:
            events = dict(session.execute(select(WebhookEvent.resource_id, WebhookEvent.id)).all())
            for job_id in (old_done, old_pending):
                session.execute(update(WebhookEvent).where(WebhookEvent.id == events[job_id])
                                .values(created_at=func.now() - text("interval '2 days'")))
            session.execute(update(WebhookDelivery).where(WebhookDelivery.event_id.in_(
                [events[old_done], events[recent_done]])).values(status="delivered"))
        assert prune(settings=get_settings()) == 1
        assert {d["event_id"] for d in deliveries(client, created["id"])} == {events[old_pending], events[recent_done]}


def test_deleting_a_hook_drops_its_pending_deliveries(make_app: Callable[..., TestClient]):
    with receiving(SECRET) as receiver, make_app(**FAST) as client:
        created = hook(client, receiver.url)
        cancel_queued_job()
        assert client.delete(f"/v1/webhooks/{created['id']}").status_code == 204
        assert deliver_due(settings=get_settings()) == 0
        assert receiver.requests == []


def test_delivery_works_on_the_embedded_sqlite_backend(env_for):
    from shared.migrate import upgrade

    env_for(TUNESERVE_WEBHOOK_ALLOW_PRIVATE="true")
    upgrade()
    with receiving(SECRET) as receiver:
        with session_scope() as session:
            session.add(Webhook(project="default", url=receiver.url, secret=SECRET, events=list(EVENT_TYPES)))
        job_id = cancel_queued_job()
        assert deliver_due(settings=get_settings()) == 1
        [got] = receiver.requests
        assert (got.answered, got.payload["type"], got.payload["data"]["id"]) == (200, "job.cancelled", job_id)


@pytest.mark.parametrize("host", ["10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
                                  "[::1]", "[::ffff:127.0.0.1]", "[fe80::1]", "[fd00::1]", "224.0.0.1"])
def test_non_global_addresses_are_refused_at_delivery_time(host: str):
    with pytest.raises(Refused, match="TUNESERVE_WEBHOOK_ALLOW_PRIVATE"):
        resolve(f"http://{host}:8080/hook", allow_private=False)
    assert resolve(f"http://{host}:8080/hook", allow_private=True) == host.strip("[]")


def test_a_public_address_is_delivered_to_as_resolved():
    assert resolve("https://93.184.215.14/hook", allow_private=False) == "93.184.215.14"


def test_deleting_a_project_takes_its_hooks_and_their_log(make_app: Callable[..., TestClient]):
    with make_app() as client:
        project_row("other")
        created = hook(client, "https://example.com/h", project="other")
        cancel_queued_job("other")
        with session_scope() as session:
            session.execute(delete(Job))  # the project must hold nothing else to be deleted
            session.execute(delete(Dataset))
        assert client.delete("/v1/projects/other").status_code == 204
        assert client.get(f"/v1/webhooks/{created['id']}").status_code == 404
        with session_scope() as session:
            assert session.scalar(select(func.count()).select_from(WebhookEvent)) == 0
            assert session.scalar(select(func.count()).select_from(WebhookDelivery)) == 0
