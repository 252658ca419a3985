"""Schemathesis fuzzes every operation of /openapi.json: no input may cause a server error.

Bounded and repeatable: a fixed number of examples per operation, derandomized.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from kvloom_testing import RELIABILITY_KEY as KEY  # noqa: E402

AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 30


def test_no_input_causes_a_server_error(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    statuses: dict[int, int] = {}
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/tokenize", "/v1/models"}
    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case):
            r = case.call_and_validate(base_url=server.url, headers=AUTH, checks=[not_a_server_error], timeout=60)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        fuzz()
    # The fuzzer reached the engine (some requests succeeded) and its refusals were client errors.
    assert statuses.get(200, 0) > 0 and sum(statuses.values()) >= len(operations) * 5, statuses
