"""Schemathesis against the service's OpenAPI schema: generated requests (valid and not) never get a 5xx.

Hypothesis drives each operation's strategy directly (schemathesis's pytest plugin does not load under
pytest 9 here), a bounded number of examples per operation and generation mode.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

MAX_EXAMPLES = 25  # per operation and mode: bounded, a few seconds in all


@pytest.fixture(scope="module")
def api_schema(live_server):
    return schemathesis.openapi.from_url(f"{live_server.url}/openapi.json")


def test_the_schema_lists_the_operations(api_schema):
    labels = {op.ok().label for op in api_schema.get_all_operations()}
    assert {"POST /detect", "GET /healthz", "GET /readyz", "GET /metrics"} <= labels
    assert {label for label in labels if not label.split()[1].startswith("/v2")} == {
        "POST /detect",
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
    }  # the /v2 operations: test_fuzz_http.py


@pytest.mark.parametrize(
    ("label", "mode"),
    [
        ("POST /detect", GenerationMode.POSITIVE),
        ("POST /detect", GenerationMode.NEGATIVE),  # the only operation with inputs to get wrong
        ("GET /healthz", GenerationMode.POSITIVE),
        ("GET /readyz", GenerationMode.POSITIVE),
        ("GET /metrics", GenerationMode.POSITIVE),
    ],
    ids=lambda v: getattr(v, "value", v),
)
def test_no_server_errors(api_schema, label, mode):
    operation = api_schema.find_operation_by_label(label)
    calls = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def check(case):
        response = case.call_and_validate(checks=[not_a_server_error], timeout=30)
        calls.append(response.status_code)

    check()
    assert calls and all(code < 500 for code in calls)
