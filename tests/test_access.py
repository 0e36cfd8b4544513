"""Two teams on one service: every route, called with the other team's key, answers 404 (or 403 for
admin-only routes) and changes nothing; the owning team's key gets past the check on the same call.

The walk is driven by the OpenAPI schema and the app's route table, so a route added later without a
row in ``CALLS`` fails here until someone decides what another team may do with it.
"""

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from tests.helpers import job_row, ready_dataset
from tests.model_rows import publish_model
from tests.synthetic import jpeg_bytes, make_image, make_zip

ADMIN = "root-bootstrap-key"


@dataclass
class Teams:
    client: TestClient
    alpha: dict[str, str]  # Authorization headers of alpha's member key
    beta: dict[str, str]
    admin: dict[str, str]
    ids: dict[str, str]  # alpha's resources


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def teams(make_app: Callable[..., TestClient], tmp_path) -> Iterator[Teams]:
    with make_app(TUNESERVE_API_KEYS=ADMIN) as client:
        admin = bearer(ADMIN)
        keys = {}
        for name in ("alpha", "beta"):
            assert client.post("/v1/projects", json={"name": name}, headers=admin).status_code == 201
            created = client.post("/v1/keys", json={"name": f"{name}-ci", "role": "member", "projects": [name]},
                                  headers=admin)
            assert created.status_code == 201, created.text
            keys[name] = created.json()["key"]
        model_id = publish_model(project="alpha")
        job_id = client.get(f"/v1/models/{model_id}", headers=bearer(keys["alpha"])).json()["job_id"]
        dataset_id = ready_dataset("alpha-ds", project="alpha")
        ids = {"model": model_id, "job": job_id, "dataset": dataset_id,
               "queued_job": job_row(dataset_id, project="alpha"), "key": "", "tmp": str(tmp_path)}
        ids["key"] = client.get("/v1/keys", headers=admin).json()["data"][0]["id"]
        hook = client.post("/v1/webhooks?project=alpha", headers=bearer(keys["alpha"]),
                           json={"url": "https://hooks.example.com/alpha", "secret": "alpha-secret-0123456789"})
        assert hook.status_code == 201, hook.text
        ids["hook"] = hook.json()["id"]
        batch = client.post("/v1/batch-predictions", headers=bearer(keys["alpha"]), json={"dataset_id": dataset_id})
        assert batch.status_code == 202, batch.text
        ids["batch"] = batch.json()["id"]
        yield Teams(client=client, alpha=bearer(keys["alpha"]), beta=bearer(keys["beta"]), admin=admin, ids=ids)


def image() -> dict[str, Any]:
    return {"file": ("a.jpg", jpeg_bytes(make_image("red", random.Random(0), 32)), "image/jpeg")}


def oip_image() -> dict[str, Any]:
    """An Open Inference Protocol request with one JPEG (BYTES, base64 in JSON)."""
    import base64

    data = base64.b64encode(jpeg_bytes(make_image("red", random.Random(0), 32))).decode()
    return {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [data]}]}


def archive(ids: dict[str, str]) -> dict[str, Any]:
    from pathlib import Path

    path = make_zip(Path(ids["tmp"]) / "team.zip", classes=["red", "blue"], per_class=5, size=32)
    return {"file": ("team.zip", path.read_bytes(), "application/zip")}


# (method, schema path) -> (concrete path, request kwargs, status another team gets). 403: admin-only route.
Call = tuple[str, Callable[[dict[str, str]], dict[str, Any]], int]
CALLS: dict[tuple[str, str], Call] = {
    ("GET", "/v1/projects/{name}"): ("/v1/projects/alpha", lambda i: {}, 404),
    ("PATCH", "/v1/projects/{name}"): ("/v1/projects/alpha", lambda i: {"json": {"quota_mb": 1}}, 403),
    ("DELETE", "/v1/projects/{name}"): ("/v1/projects/alpha", lambda i: {}, 403),
    ("POST", "/v1/projects"): ("/v1/projects", lambda i: {"json": {"name": "gamma"}}, 403),
    ("DELETE", "/v1/projects/{name}/pin"): ("/v1/projects/alpha/pin", lambda i: {}, 404),
    ("POST", "/v1/projects/{name}/predict"): ("/v1/projects/alpha/predict", lambda i: {"files": image()}, 404),
    ("GET", "/v1/keys"): ("/v1/keys", lambda i: {}, 403),
    ("POST", "/v1/keys"): ("/v1/keys", lambda i: {"json": {"name": "x", "role": "admin"}}, 403),
    ("DELETE", "/v1/keys/{key_id}"): ("/v1/keys/{key}", lambda i: {}, 403),
    ("GET", "/v1/datasets"): ("/v1/datasets?project=alpha", lambda i: {}, 404),
    ("POST", "/v1/datasets"): ("/v1/datasets?project=alpha", lambda i: {"files": archive(i)}, 404),
    ("GET", "/v1/datasets/{dataset_id}"): ("/v1/datasets/{dataset}", lambda i: {}, 404),
    ("DELETE", "/v1/datasets/{dataset_id}"): ("/v1/datasets/{dataset}", lambda i: {}, 404),
    ("GET", "/v1/jobs"): ("/v1/jobs?project=alpha", lambda i: {}, 404),
    ("POST", "/v1/jobs"): ("/v1/jobs", lambda i: {"json": {"dataset_id": i["dataset"]}}, 404),
    ("GET", "/v1/jobs/{job_id}"): ("/v1/jobs/{job}", lambda i: {}, 404),
    ("DELETE", "/v1/jobs/{job_id}"): ("/v1/jobs/{job}", lambda i: {}, 404),
    ("POST", "/v1/jobs/{job_id}/cancel"): ("/v1/jobs/{queued_job}/cancel", lambda i: {}, 404),
    ("GET", "/v1/jobs/{job_id}/events"): ("/v1/jobs/{job}/events", lambda i: {}, 404),
    ("GET", "/v1/jobs/{job_id}/plots/curves.png"): ("/v1/jobs/{job}/plots/curves.png", lambda i: {}, 404),
    ("GET", "/v1/models"): ("/v1/models?project=alpha", lambda i: {}, 404),
    ("GET", "/v1/models/{model_id}"): ("/v1/models/{model}", lambda i: {}, 404),
    ("DELETE", "/v1/models/{model_id}"): ("/v1/models/{model}?force=true", lambda i: {}, 404),
    ("POST", "/v1/models/{model_id}/promote"): ("/v1/models/{model}/promote", lambda i: {}, 404),
    ("PATCH", "/v1/models/{model_id}"): ("/v1/models/{model}", lambda i: {"json": {"min_score": 0.9}}, 404),
    ("DELETE", "/v1/models/pin"): ("/v1/models/pin?project=alpha", lambda i: {}, 404),
    ("GET", "/v1/models/{model_id}/artifact"): ("/v1/models/{model}/artifact", lambda i: {}, 404),
    ("GET", "/v1/models/{model_id}/plots/confusion.png"): ("/v1/models/{model}/plots/confusion.png",
                                                          lambda i: {}, 404),
    ("GET", "/v1/models/{model_id}/misclassified/{name}"): ("/v1/models/{model}/misclassified/x.jpg",
                                                           lambda i: {}, 404),
    ("POST", "/v1/predict"): ("/v1/predict", lambda i: {"files": image(), "data": {"project": "alpha"}}, 404),
    ("POST", "/predict"): ("/predict", lambda i: {"files": image(), "data": {"model_id": i["model"]}}, 404),
    ("GET", "/metrics"): ("/metrics", lambda i: {}, 403),
    ("GET", "/v2/models/{name}"): ("/v2/models/alpha", lambda i: {}, 404),
    ("GET", "/v2/models/{name}/ready"): ("/v2/models/alpha/ready", lambda i: {}, 404),
    ("GET", "/v2/models/{name}/versions/{version}"): ("/v2/models/alpha/versions/{model}", lambda i: {}, 404),
    ("GET", "/v2/models/{name}/versions/{version}/ready"): ("/v2/models/alpha/versions/{model}/ready",
                                                            lambda i: {}, 404),
    ("POST", "/v2/models/{name}/infer"): ("/v2/models/alpha/infer", lambda i: {"json": oip_image()}, 404),
    ("POST", "/v2/models/{name}/versions/{version}/infer"): ("/v2/models/alpha/versions/{model}/infer",
                                                             lambda i: {"json": oip_image()}, 404),
    ("GET", "/v1/webhooks"): ("/v1/webhooks?project=alpha", lambda i: {}, 404),
    ("POST", "/v1/webhooks"): ("/v1/webhooks", lambda i: {"json": {"url": "https://x.example.com/h", "project": "alpha",
                                                                "secret": "0123456789abcdef"}}, 404),
    ("GET", "/v1/webhooks/{hook_id}"): ("/v1/webhooks/{hook}", lambda i: {}, 404),
    ("DELETE", "/v1/webhooks/{hook_id}"): ("/v1/webhooks/{hook}", lambda i: {}, 404),
    ("GET", "/v1/webhooks/{hook_id}/deliveries"): ("/v1/webhooks/{hook}/deliveries", lambda i: {}, 404),
    ("GET", "/v1/batch-predictions"): ("/v1/batch-predictions?project=alpha", lambda i: {}, 404),
    ("POST", "/v1/batch-predictions"): ("/v1/batch-predictions", lambda i: {"json": {"dataset_id": i["dataset"]}},
                                        404),
    ("GET", "/v1/batch-predictions/{batch_id}"): ("/v1/batch-predictions/{batch}", lambda i: {}, 404),
    ("GET", "/v1/batch-predictions/{batch_id}/results"): ("/v1/batch-predictions/{batch}/results?format=csv",
                                                          lambda i: {}, 404),
    ("POST", "/v1/batch-predictions/{batch_id}/cancel"): ("/v1/batch-predictions/{batch}/cancel", lambda i: {}, 404),
    ("DELETE", "/v1/batch-predictions/{batch_id}"): ("/v1/batch-predictions/{batch}", lambda i: {}, 404),
}
# Routes with no team data: health for load balancers, the UI shell and the offline API docs' assets.
UNSCOPED = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/"), ("GET", "/ui/config.json"), ("GET", "/docs"),
            ("GET", "/docs/oauth2-redirect"), ("GET", "/redoc"), ("GET", "/static-docs/redoc.standalone.js"),
            ("GET", "/v2"), ("GET", "/v2/health/live"), ("GET", "/v2/health/ready")}
# Lists that answer 200 with only the caller's rows when no ?project= is given (checked on their own below).
LISTS = ["/v1/projects", "/v1/datasets", "/v1/jobs", "/v1/models", "/v1/webhooks", "/v1/batch-predictions"]
# What the access layer answers for a row or project the caller may not see.
ACCESS_CODES = {"project_not_found", "dataset_not_found", "job_not_found", "model_not_found", "key_not_found",
                "webhook_not_found", "batch_prediction_not_found", "forbidden"}


def all_routes() -> set[tuple[str, str]]:
    from api.main import create_app

    app = create_app()
    found = {(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops}
    return found | {(m, r.path) for r in app.routes if isinstance(r, APIRoute) for m in (r.methods or set()) - {"HEAD"}}


def test_every_route_is_in_the_access_table():
    missing = sorted(all_routes() - set(CALLS) - UNSCOPED - {("GET", "/v1/projects")})
    assert missing == [], f"routes with no cross-team access check in CALLS: {missing}"


@pytest.mark.parametrize("route", sorted(CALLS), ids=lambda r: f"{r[0]} {r[1]}")
def test_another_teams_key_gets_404_or_403_and_changes_nothing(teams: Teams, route: tuple[str, str]):
    method, _ = route
    path, kwargs, expected = CALLS[route]
    url = path.format(**teams.ids)
    before = snapshot(teams)

    answer = teams.client.request(method, url, headers=teams.beta, **kwargs(teams.ids))

    assert answer.status_code == expected, answer.text
    assert answer.json()["code"] in ACCESS_CODES
    assert snapshot(teams) == before
    # The same call from the owning team (or, for admin-only routes, from an admin) gets past the check.
    allowed = teams.alpha if expected == 404 else teams.admin
    answer = teams.client.request(method, url, headers=allowed, **kwargs(teams.ids))
    assert answer.status_code < 400 or answer.json()["code"] not in ACCESS_CODES, answer.text


def snapshot(teams: Teams) -> dict[str, Any]:
    """What alpha has, as its admin sees it."""
    get = teams.client.get
    return {
        "project": {k: v for k, v in get("/v1/projects/alpha", headers=teams.admin).json().items() if k != "usage"},
        "datasets": get("/v1/datasets?project=alpha", headers=teams.admin).json(),
        "jobs": get("/v1/jobs?project=alpha", headers=teams.admin).json(),
        "models": get("/v1/models?project=alpha", headers=teams.admin).json(),
        "batches": get("/v1/batch-predictions?project=alpha", headers=teams.admin).json(),
        "keys": [(k["id"], k["projects"]) for k in get("/v1/keys", headers=teams.admin).json()["data"]],
        "webhooks": get("/v1/webhooks?project=alpha", headers=teams.admin).json(),
    }


def test_lists_without_a_filter_hold_only_the_callers_projects(teams: Teams):
    for path in LISTS:
        beta = teams.client.get(path, headers=teams.beta).json()
        alpha = teams.client.get(path, headers=teams.alpha).json()
        if path == "/v1/projects":
            assert [p["name"] for p in beta["data"]] == ["beta"]
            assert [p["name"] for p in alpha["data"]] == ["alpha"]
            continue
        assert beta == {"data": [], "count": 0}, path
        assert alpha["count"] >= 1 and {row["project"] for row in alpha["data"]} == {"alpha"}, path
    everything = teams.client.get("/v1/projects", headers=teams.admin).json()
    assert [p["name"] for p in everything["data"]] == ["alpha", "beta", "default"]


def test_a_revoked_key_is_refused_on_the_very_next_request(teams: Teams):
    created = teams.client.post("/v1/keys", json={"name": "temp", "role": "member", "projects": ["alpha"]},
                                headers=teams.admin).json()
    temp = bearer(created["key"])
    assert teams.client.get("/v1/datasets", headers=temp).status_code == 200
    assert teams.client.delete(f"/v1/keys/{created['id']}", headers=teams.admin).status_code == 204
    refused = teams.client.get("/v1/datasets", headers=temp)
    assert (refused.status_code, refused.json()["code"]) == (401, "invalid_api_key")
    listed = teams.client.get("/v1/keys?include_revoked=true", headers=teams.admin).json()["data"]
    row = next(k for k in listed if k["id"] == created["id"])
    assert row["revoked_at"] is not None and row["last_used_at"] is not None and "key" not in row
    assert created["id"] not in {k["id"] for k in teams.client.get("/v1/keys", headers=teams.admin).json()["data"]}


def test_keys_are_stored_only_as_hashes(teams: Teams):
    import psycopg

    from shared.config import get_settings

    created = teams.client.post("/v1/keys", json={"name": "h", "role": "admin"}, headers=teams.admin).json()
    assert created["key"].startswith("ts_") and len(created["key"]) > 40
    with psycopg.connect(get_settings().db_url.replace("+psycopg", "")) as conn:
        stored = [row[0] for row in conn.execute("SELECT key_hash FROM api_keys")]
    assert created["key"] not in stored and all(len(h) == 64 for h in stored)


def test_key_requests_that_name_nothing_real_are_422(teams: Teams):
    cases = [({"name": "x", "role": "member", "projects": ["nope"]}, "project_not_found"),
             ({"name": "x", "role": "member", "projects": []}, "projects_required"),
             ({"name": "x", "role": "owner", "projects": ["alpha"]}, "validation_error"),
             ({"name": "", "role": "admin"}, "validation_error"),
             ({"name": "x", "role": "member", "projects": ["Bad Name"]}, "validation_error")]
    for body, code in cases:
        answer = teams.client.post("/v1/keys", json=body, headers=teams.admin)
        assert (answer.status_code, answer.json()["code"]) == (422, code), body


def test_idempotency_keys_are_scoped_per_principal(teams: Teams):
    body = {"dataset_id": teams.ids["dataset"], "hyperparameters": {"epochs": 1}}
    mine = teams.client.post("/v1/jobs", json=body, headers={**teams.alpha, "Idempotency-Key": "same"})
    again = teams.client.post("/v1/jobs", json=body, headers={**teams.alpha, "Idempotency-Key": "same"})
    admins = teams.client.post("/v1/jobs", json=body, headers={**teams.admin, "Idempotency-Key": "same"})
    assert mine.status_code == again.status_code == admins.status_code == 202
    assert mine.json()["id"] == again.json()["id"] != admins.json()["id"]
    assert mine.json()["project"] == admins.json()["project"] == "alpha"


def test_a_member_cannot_create_into_another_project_by_form_field(teams: Teams):
    answer = teams.client.post("/v1/datasets", files=archive(teams.ids), data={"project": "alpha"},
                               headers=teams.beta)
    assert (answer.status_code, answer.json()["code"]) == (404, "project_not_found")
    from shared.config import get_settings

    assert list((get_settings().data_dir / "tmp").glob("*")) == []


def test_an_open_service_closes_when_its_first_key_is_created(make_app: Callable[..., TestClient]):
    with make_app() as client:
        assert client.get("/v1/jobs").status_code == 200  # no keys anywhere: open and single-user
        assert client.get("/ui/config.json").json() == {"auth_required": False}
        created = client.post("/v1/keys", json={"name": "first", "role": "admin"})
        assert created.status_code == 201
        closed = client.get("/v1/jobs")
        assert (closed.status_code, closed.json()["code"]) == (401, "missing_api_key")
        assert client.get("/ui/config.json").json() == {"auth_required": True}
        assert client.get("/v1/jobs", headers=bearer(created.json()["key"])).status_code == 200
        assert client.delete(f"/v1/keys/{created.json()['id']}", headers=bearer(created.json()["key"])).status_code \
            == 204
        assert client.get("/v1/jobs").status_code == 200  # its only key revoked: open again


def test_names_and_ids_that_cannot_exist_are_404_without_reaching_the_database(teams: Teams):
    for path in ("/v1/keys/%00abc", "/v1/keys/not-a-uuid"):
        answer = teams.client.delete(path, headers=teams.admin)
        assert (answer.status_code, answer.json()["code"]) == (404, "key_not_found"), path
    for name in ("%00abc", "Team-A", "a" * 64):
        answer = teams.client.get(f"/v1/projects/{name}", headers=teams.admin)
        assert (answer.status_code, answer.json()["code"]) == (404, "project_not_found"), name
    # A form field is checked like ?project=: a name that cannot be one is a 422 naming the field.
    named = teams.client.post("/v1/predict", files=image(), data={"project": "x\x00y"}, headers=teams.admin)
    assert (named.status_code, named.json()["code"], named.json()["errors"][0]["field"]) == (
        422, "validation_error", "project")
