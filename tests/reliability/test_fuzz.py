"""A bounded schemathesis run over the server's own OpenAPI document: property-based requests (valid and
invalid bodies) to every operation; none may get a 5xx, and the server ends healthy and empty.

Generation stays small on the CPU: the server's context is 48 tokens and n is capped at 2 here (the
hostile-input table covers huge values of both). schemathesis' own pytest plugin does not run under this
pytest, so each operation's case strategy is driven by hypothesis directly."""

from __future__ import annotations

import httpx
import pytest
from harness import LoopbackServer

schemathesis = pytest.importorskip("schemathesis", reason="a dev dependency (pyproject [dev])")
from hypothesis import HealthCheck, settings  # noqa: E402

EXAMPLES = 25  # per operation
SEEN: dict[str, dict[int, int]] = {}


@pytest.fixture(scope="module")
def fuzz_server(tiny_checkpoint):
    srv = LoopbackServer(str(tiny_checkpoint), api_key=None, max_model_len=48, max_request_body_bytes=1024 * 1024)
    srv.wait_healthy()
    yield srv
    srv.stop()
    print(f"schemathesis: {sum(sum(v.values()) for v in SEEN.values())} cases, statuses per operation {SEEN}")


def test_no_5xx(fuzz_server):
    from hypothesis import given

    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/chat/completions", "POST /v1/completions", "POST /tokenize", "POST /detokenize", "GET /health"}
    for op in operations:

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def one(case):
            if isinstance(case.body, dict):
                for key in ("n", "best_of"):
                    if isinstance(case.body.get(key), int) and case.body[key] > 2:
                        case.body[key] = 2
                if isinstance(case.body.get("model"), str) and len(case.body["model"]) % 2 == 0:
                    del case.body["model"]  # half the cases reach the model (a random name is a 404)
            response = case.call(base_url=fuzz_server.url, timeout=60)
            seen = SEEN.setdefault(f"{case.method} {case.path}", {})
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (case.method, case.path, case.body, response.status_code,
                                                response.text[:500])

        one()
    assert sum(sum(v.values()) for v in SEEN.values()) >= len(operations) * 5
    assert httpx.get(fuzz_server.url + "/health").status_code == 200
    assert fuzz_server.engine_idle(timeout=30)
