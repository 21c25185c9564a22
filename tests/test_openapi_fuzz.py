"""Property-based fuzzing of every operation in /openapi.json with schemathesis."""

import itertools

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

OPERATIONS = {
    "GET /health",
    "GET /ready",
    "GET /cars",
    "POST /cars",
    "GET /cars/{id}",
    "PUT /cars/{id}",
    "PATCH /cars/{id}",
    "DELETE /cars/{id}",
}  # schemathesis leaves out the document's own path, GET /openapi.json


def schema_can_express(case):
    """Keep the cases whose validity JSON Schema can state.

    Four rules of the API are beyond it: If-Match must name the car's current ETag, an
    Idempotency-Key once used belongs to its first body, a year like 2018.0 counts as an integer
    there but not here, and a body's id must equal the id in the URL. test_api.py and
    test_idempotency.py cover them.
    """
    if {"If-Match", "Idempotency-Key"} & set(case.headers or {}):
        return False
    if not isinstance(case.body, dict):
        return True
    url_id = (case.path_parameters or {}).get("id")
    return not isinstance(case.body.get("year"), float) and case.body.get("id", url_id) == url_id


def test_no_generated_request_breaks_the_api_or_its_document(testapp, app, api_token):
    # Writes carry the token the document's security names; schemathesis also checks that a
    # write without it, or with a wrong one, is refused.
    auth = {"Authorization": f"Bearer {api_token}"}
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} == OPERATIONS
    for operation, mode in itertools.product(operations, schemathesis.GenerationMode):

        @given(case=operation.as_strategy(mode).filter(schema_can_express))
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
        def fuzz(case):
            case.call_and_validate(headers=auth)

        try:
            fuzz()
        except Unsatisfiable:
            # Only an operation without any input has no invalid variant to generate.
            assert mode is schemathesis.GenerationMode.NEGATIVE
            assert operation.label in ("GET /health", "GET /ready")
