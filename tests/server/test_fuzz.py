"""API fuzzing with schemathesis against the real default model: cases generated from the
server's own OpenAPI schema (valid and invalid bodies, headers, methods), for every endpoint.

Property: every answer is a 2xx, or a 4xx in OpenAI's error shape; never a 5xx, a hang or a
dropped connection; afterwards the server is healthy, serves, and holds no request.

Generated outputs are capped at 2 tokens and 2 choices (only where a value is valid and larger):
the property concerns the request handling, and long generations would only slow the run down.
"""

import os
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from server.app import create_app
from server.config import ServerConfig

pytestmark = pytest.mark.slow

MIN_CASES = 2000
EXAMPLES = int(os.environ.get("DSPARK_FUZZ_EXAMPLES", "420"))  # per operation
CAPS = {"max_tokens": 2, "max_completion_tokens": 2, "n": 2, "top_logprobs": 2}
CALLS: Counter[str] = Counter()
STATUSES: Counter[int] = Counter()


# The app's schema, built without loading a model (schemathesis' fixture-based loader does not
# work with pytest 9); the first test checks that the server serves this very schema.
SCHEMA = create_app(ServerConfig()).openapi()
schema = schemathesis.openapi.from_dict(SCHEMA)


def test_the_served_schema_is_the_fuzzed_one(real_server):
    assert httpx.get(f"{real_server.url}/openapi.json").json() == SCHEMA


def cap(body: object) -> None:
    if not isinstance(body, dict):
        return
    for key, limit in CAPS.items():
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            body[key] = limit
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = CAPS["max_tokens"]  # not the rest of the context window


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_never_get_a_server_error(case, real_server):
    cap(case.body)
    response = case.call(base_url=real_server.url, timeout=120)  # a hang fails here
    CALLS[f"{case.method} {case.path}"] += 1
    STATUSES[response.status_code] += 1
    assert response.status_code < 500, f"{case.method} {case.path} {case.body!r}: {response.text[:500]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, response.text
        assert isinstance(error["message"], str) and error["message"]


def test_the_fuzzed_server_is_healthy_and_serves(real_server):
    total = sum(CALLS.values())
    print(f"fuzz cases: {total}; by operation {dict(CALLS)}; by status {dict(sorted(STATUSES.items()))}")
    if os.environ.get("DSPARK_FUZZ_EXAMPLES") is None:
        assert total >= MIN_CASES, dict(CALLS)
    fuzzed = {key.split(" ", 1)[1] for key in CALLS}  # and methods the schema does not list
    assert fuzzed == set(SCHEMA["paths"]), fuzzed  # every endpoint was fuzzed
    assert httpx.get(f"{real_server.url}/health").status_code == 200
    r = httpx.post(f"{real_server.url}/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    metrics = httpx.get(f"{real_server.url}/metrics").text
    running = [line for line in metrics.splitlines() if line.startswith("dspark:num_requests_running")]
    assert running and float(running[0].split()[-1]) == 0.0
    assert "Traceback" not in real_server.log()
