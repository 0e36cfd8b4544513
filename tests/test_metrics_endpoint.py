"""GET /metrics on a live API: database-backed gauges, per-route HTTP counters, and request-id JSON logs."""

import json
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from shared.orm import Dataset, Job, Model
from tests.live import serve


@pytest.fixture(scope="module")
def service(pg_url, redis_url, tmp_path_factory):
    with serve(tmp_path_factory.mktemp("metrics") / "data", pg_url, redis_url, workers=0) as service:
        yield service


def scrape(service) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with service.client() as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def add_rows(database_url: str) -> tuple[str, str]:
    """Two queued jobs, one running at 123.5 images/s, one succeeded with a pinned model."""
    dataset, running, done, model = (str(uuid.uuid4()) for _ in range(4))
    engine = create_engine(database_url)
    with Session(engine) as session:
        session.add(Dataset(id=dataset, name="d", status="ready", filename="d.zip"))
        session.flush()
        for job_id, status, progress in ((str(uuid.uuid4()), "queued", {}), (str(uuid.uuid4()), "queued", {}),
                                         (running, "running", {"epoch": 1, "epochs": 3, "step": 2, "steps": 9,
                                                               "images_per_second": 123.5}),
                                         (done, "succeeded", {})):
            session.add(Job(id=job_id, dataset_id=dataset, status=status, hyperparameters={}, progress=progress))
        session.flush()
        session.add(Model(id=model, job_id=done, dataset_id=dataset, base_model="resnet18", classes=["a", "b"],
                          image_size=32, metrics={}, pinned=True))
        session.commit()
    engine.dispose()
    return running, model


def test_metrics_read_jobs_queue_speed_and_serving_model_from_the_database(service):
    running, model = add_rows(service.env["TUNESERVE_DATABASE_URL"])

    samples = scrape(service)

    assert {state: samples[("tuneserve_jobs", (("state", state),))] for state in
            ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")} == {
        "queued": 2, "running": 1, "cancelling": 0, "succeeded": 1, "failed": 0, "cancelled": 0}
    assert samples[("tuneserve_queue_depth", ())] == 2
    assert samples[("tuneserve_training_images_per_second", (("job_id", running),))] == 123.5
    assert samples[("tuneserve_training_images_per_second_total", ())] == 123.5
    serving = (("model_id", model), ("pinned", "true"), ("project", "default"))
    assert samples[("tuneserve_model_in_service", serving)] == 1


def test_requests_are_counted_by_route_template_and_logged_as_json_with_ids(service):
    job_ids = [str(uuid.uuid4()) for _ in range(3)]
    with service.client() as client:
        for n, job_id in enumerate(job_ids):
            response = client.get(f"/v1/jobs/{job_id}", headers={"X-Request-ID": f"req-{n}"})
            assert response.status_code == 404 and response.headers["x-request-id"] == f"req-{n}"
        assert client.get("/no/such/page").status_code == 404
        assert client.get("/v1/jobs").status_code == 200

    samples = scrape(service)

    route = (("method", "GET"), ("route", "/v1/jobs/{job_id}"))
    assert samples[("tuneserve_http_requests_total", (*route, ("status", "404")))] == 3
    assert samples[("tuneserve_http_request_duration_seconds_count", route)] == 3
    assert samples[("tuneserve_http_requests_total", (("method", "GET"), ("route", "unmatched"),
                                                      ("status", "404")))] == 1
    assert samples[("tuneserve_http_requests_total", (("method", "GET"), ("route", "/v1/jobs"),
                                                      ("status", "200")))] == 1
    for name in ("tuneserve_predict_latency_seconds_count", "tuneserve_predict_batch_size_count",
                 "tuneserve_predict_batch_seconds_count"):
        assert samples[(name, ())] == 0
    logged = [json.loads(line) for line in (service.log_dir / "api.log").read_text().splitlines()
              if line.startswith("{")]
    mine = [entry for entry in logged if entry.get("request_id", "").startswith("req-")]
    assert [(e["request_id"], e["job_id"], e["route"], e["status"]) for e in mine] == [
        (f"req-{n}", job_id, "/v1/jobs/{job_id}", 404) for n, job_id in enumerate(job_ids)]
