"""Schemathesis against the live server's OpenAPI schema: no input gives a 5xx.

Valid and invalid requests are generated from the schema FastAPI publishes (bounded,
derandomized examples per operation) and sent to the live tiny-model server on loopback.
`max_tokens`-like fields are capped so that a valid request decodes a few tokens, not 500:
the point is the server's handling of the input, not long decodes.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from tests.server.conftest import API_KEY

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
MAX_DECODE = 4


def _aim(body: object) -> None:
    """Point a generated body at the served model (a random name is a 404 that never reaches
    the engine) and cap valid token limits at MAX_DECODE; invalid values stay as generated."""
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str):
        body["model"] = "tiny"
    keys = ("max_output_tokens",) if "input" in body else ("max_tokens", "max_completion_tokens")  # responses
    if all(body.get(k) is None for k in keys):
        body[keys[0]] = MAX_DECODE
    for key in keys:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_DECODE:
            body[key] = MAX_DECODE


@pytest.fixture(scope="module")
def api_schema(live):
    return schemathesis.openapi.from_url(live[0].url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, live):
    _aim(case.body)
    case.call_and_validate(base_url=live[0].url, headers=HEADERS, checks=[not_a_server_error], timeout=60)
