"""Schema fuzzing of our own OpenAPI document against the live API: no 5xx, every response matches the
schema (status codes, content types, bodies). Bounded so it stays a few seconds per operation."""

from typing import Any

from hypothesis import HealthCheck, given, settings

from tests.helpers import model_artifact

MAX_EXAMPLES = 15
# Schema-valid but semantically refused by design: bytes that are not an archive or an image, and
# hyperparameters whose val_fraction + test_fraction leave too little for training (a cross-field rule).
# A member key needs at least one project (a rule between two fields the schema cannot state).
# An inference request's tensor must agree with its own shape, datatype and byte counts, and be an image.
CONTENT_CHECKED = {"POST /v1/datasets", "POST /v1/predict", "POST /v1/jobs", "POST /v1/keys",
                   "POST /v1/batch-predictions", "POST /v1/projects/{name}/predict", "POST /v2/models/{name}/infer",
                   "POST /v2/models/{name}/versions/{version}/infer",
                   "POST /v1/webhooks"}  # a URL needs an http(s) scheme and a host: more than its schema says
# Fuzzed as an admin: a key the fuzzer creates then cannot close the open service under it.
ADMIN = "fuzz-admin-key"


def fuzz(operation: Any, calls: dict[str, int]) -> None:
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    excluded = [positive_data_acceptance] if operation.label in CONTENT_CHECKED else []

    @given(case=operation.as_strategy())
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        calls[operation.label] = calls.get(operation.label, 0) + 1
        case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN}"}, excluded_checks=excluded)

    check()


def test_every_operation_conforms_to_the_schema(migrated, start_service):
    import schemathesis

    service = start_service({**migrated, "TUNESERVE_API_KEYS": ADMIN}, workers=0)
    model_artifact()  # a servable model and a ready dataset, so requests get past the "nothing yet" answers
    schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json", headers={"Authorization": f"Bearer {ADMIN}"})
    calls: dict[str, int] = {}
    failures: dict[str, str] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        try:
            fuzz(operation, calls)
        except Exception as exc:  # collect every operation's failures, then report them together
            failures[operation.label] = str(exc)[:2000]
    print(f"schemathesis: {sum(calls.values())} cases over {len(calls)} operations")
    assert len(calls) >= 15
    assert failures == {}
