"""HTTP conventions clients rely on: Location on 201/202, ETag and 304 for job pollers, RFC 9457 problem
bodies on every error (also the guard's early answers, validation and unknown routes), an OpenAPI schema
with a bearer scheme and readable operationIds, and a client generated from that schema that works."""

import importlib
import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.helpers import job_row, ready_dataset
from tests.model_rows import publish_model
from tests.synthetic import make_zip

ADMIN = "conventions-admin-key"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
PROBLEM_FIELDS = {"type", "title", "status", "detail", "code", "instance"}


@pytest.fixture
def client(make_app: Callable[..., TestClient]) -> Iterator[TestClient]:
    with make_app(TUNESERVE_API_KEYS=ADMIN) as test_client:
        yield test_client


# Every operation that answers 201 or 202: the call that makes it, and the collection its Location is in.
CREATED: dict[tuple[str, str], Callable[[TestClient, Path], Any]] = {
    ("POST", "/v1/projects"): lambda c, _: c.post("/v1/projects", json={"name": "gamma"}, headers=AUTH),
    ("POST", "/v1/keys"): lambda c, _: c.post("/v1/keys", json={"name": "ci", "role": "admin"}, headers=AUTH),
    ("POST", "/v1/datasets"): lambda c, tmp: c.post("/v1/datasets", headers=AUTH, files={"file": (
        "a.zip", make_zip(tmp / "a.zip", classes=["red", "blue"], per_class=2, size=32).read_bytes())}),
    ("POST", "/v1/jobs"): lambda c, _: c.post("/v1/jobs", json={"dataset_id": ready_dataset()}, headers=AUTH),
    ("POST", "/v1/jobs/{job_id}/cancel"): lambda c, _: c.post(f"/v1/jobs/{job_row(ready_dataset())}/cancel",
                                                              headers=AUTH),
    ("POST", "/v1/webhooks"): lambda c, _: c.post("/v1/webhooks", headers=AUTH, json={
        "url": "https://hooks.example.com/tuneserve", "secret": "s" * 32}),
    ("POST", "/v1/batch-predictions"): lambda c, _: (publish_model(), c.post(
        "/v1/batch-predictions", json={"dataset_id": ready_dataset()}, headers=AUTH))[1],
    ("POST", "/v1/batch-predictions/{batch_id}/cancel"): lambda c, tmp: c.post(
        f"{CREATED[('POST', '/v1/batch-predictions')](c, tmp).headers['location']}/cancel", headers=AUTH),
}


def test_every_201_and_202_operation_is_checked_for_a_location(client: TestClient):
    schema = client.get("/openapi.json", headers=AUTH).json()
    created = {(method.upper(), path) for path, operations in schema["paths"].items()
               for method, operation in operations.items() if {"201", "202"} & set(operation["responses"])}
    assert created == set(CREATED)


@pytest.mark.parametrize("route", sorted(CREATED), ids=lambda r: f"{r[0]} {r[1]}")
def test_created_and_accepted_answers_locate_their_resource(client: TestClient, tmp_path: Path, route):
    answer = CREATED[route](client, tmp_path)

    assert answer.status_code in (201, 202), answer.text
    body = answer.json()
    collection = route[1].split("/{")[0]
    assert answer.headers["location"] == f"{collection}/{body.get('id') or body['name']}"
    if collection != "/v1/keys":  # never shown again (it holds a secret): no GET
        again = client.get(answer.headers["location"], headers=AUTH)
        assert again.status_code == 200 and again.json().get("id", again.json().get("name")) == \
            body.get("id", body.get("name"))


def test_a_job_poller_gets_304_until_the_job_changes(client: TestClient):
    job_id = job_row(ready_dataset())
    first = client.get(f"/v1/jobs/{job_id}", headers=AUTH)
    etag = first.headers["etag"]
    assert first.status_code == 200 and etag.startswith('"') and first.json()["status"] == "queued"

    unchanged = client.get(f"/v1/jobs/{job_id}", headers={**AUTH, "If-None-Match": etag})
    weak = client.get(f"/v1/jobs/{job_id}", headers={**AUTH, "If-None-Match": f'"other", W/{etag}'})
    assert (unchanged.status_code, unchanged.content, unchanged.headers["etag"]) == (304, b"", etag)
    assert weak.status_code == 304

    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH).status_code == 202
    changed = client.get(f"/v1/jobs/{job_id}", headers={**AUTH, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.json()["status"] == "cancelled"
    assert changed.headers["etag"] != etag


ERRORS: dict[str, tuple[Callable[[TestClient], Any], int, str]] = {
    "a missing job": (lambda c: c.get("/v1/jobs/00000000-0000-0000-0000-000000000000", headers=AUTH), 404,
                      "job_not_found"),
    "an unknown route": (lambda c: c.get("/v1/nothing-here", headers=AUTH), 404, "not_found"),
    "a wrong method": (lambda c: c.put("/v1/jobs", headers=AUTH), 405, "method_not_allowed"),
    "a validation error": (lambda c: c.post("/v1/jobs", json={"dataset_id": 3}, headers=AUTH), 422,
                           "validation_error"),
    "no key (the guard)": (lambda c: c.get("/v1/jobs"), 401, "missing_api_key"),
    "a JSON body over the limit (the guard)": (
        lambda c: c.post("/v1/projects", content=b"{" + b" " * 2**21 + b"}", headers={
            **AUTH, "content-type": "application/json"}), 413, "payload_too_large"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors_are_rfc9457_problems_with_our_code(client: TestClient, case: str):
    call, status, code = ERRORS[case]

    answer = call(client)

    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    body = answer.json()
    assert set(body) >= PROBLEM_FIELDS and "error" not in body  # "error" is only for /v2 (OIP) clients
    assert (body["status"], body["code"], body["type"]) == (status, code, f"urn:tuneserve:error:{code}")
    assert body["instance"] == answer.headers["x-request-id"] and body["title"] and body["detail"]


def test_an_unhandled_error_is_a_500_problem_naming_the_request(make_app: Callable[..., TestClient]):
    client = make_app()
    assert isinstance(client.app, FastAPI)

    @client.app.get("/v1/boom")
    def boom() -> None:
        raise RuntimeError("a bug")

    with client:
        answer = client.get("/v1/boom", headers={"X-Request-ID": "req-500"})

    assert (answer.status_code, answer.headers["content-type"]) == (500, "application/problem+json")
    body = answer.json()
    assert (body["code"], body["status"], body["instance"]) == ("internal_error", 500, "req-500")
    assert "a bug" not in answer.text  # the exception stays in the server's log


def test_the_schema_has_a_bearer_scheme_readable_operation_ids_and_problem_errors(client: TestClient):
    schema = client.get("/openapi.json", headers=AUTH).json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http", "scheme": "bearer", "description": schema["components"]["securitySchemes"]["HTTPBearer"][
            "description"]}
    jobs = schema["paths"]["/v1/jobs"]
    assert (jobs["get"]["operationId"], jobs["post"]["operationId"]) == ("list_jobs", "create_job")
    assert jobs["get"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]
    assert list(jobs["post"]["responses"]["404"]["content"]) == ["application/problem+json"]


def test_a_client_generated_from_the_schema_round_trips(migrated, start_service, tmp_path: Path):
    service = start_service({**migrated, "TUNESERVE_API_KEYS": ADMIN}, workers=0)
    (tmp_path / "schema.json").write_text(json.dumps(httpx.get(
        f"{service.url}/openapi.json", headers=AUTH).json()))
    (tmp_path / "config.yaml").write_text("post_hooks: []\n")  # no ruff/format run on the generated code
    subprocess.run([str(Path(sys.executable).with_name("openapi-python-client")), "generate", "--path", "schema.json",
                    "--config", "config.yaml", "--output-path", "generated"], cwd=tmp_path, check=True,
                   capture_output=True, timeout=120)
    sys.path.insert(0, str(tmp_path / "generated"))
    try:
        generated = importlib.import_module("tuneserve_client")
        create_project = importlib.import_module("tuneserve_client.api.projects.create_project")
        list_jobs = importlib.import_module("tuneserve_client.api.jobs.list_jobs")
        get_job = importlib.import_module("tuneserve_client.api.jobs.get_job")
        models = importlib.import_module("tuneserve_client.models")
        job_id = job_row(ready_dataset())
        with generated.AuthenticatedClient(base_url=service.url, token=ADMIN) as api:
            created = create_project.sync_detailed(client=api, body=models.ProjectCreate(name="generated"))
            assert created.status_code == 201 and created.parsed.name == "generated"
            assert created.headers["location"] == "/v1/projects/generated"
            listed = list_jobs.sync(client=api)
            assert (listed.count, [job.id for job in listed.data]) == (1, [job_id])
            job = get_job.sync_detailed(job_id, client=api)
            assert job.status_code == 200 and job.parsed.status.value == "queued"
            missing = get_job.sync(str(uuid.uuid4()), client=api)
            assert isinstance(missing, models.ErrorBody) and missing.code == "job_not_found"
        with generated.AuthenticatedClient(base_url=service.url, token="wrong") as api:
            refused = get_job.sync(job_id, client=api)
            assert isinstance(refused, models.ErrorBody) and (refused.status, refused.code) == (401, "invalid_api_key")
    finally:
        sys.path.remove(str(tmp_path / "generated"))
        for name in [m for m in sys.modules if m.split(".")[0] == "tuneserve_client"]:
            del sys.modules[name]
