"""Per-API-key limits: the bucket arithmetic on a fake clock, the keys file, and concurrent
clients against a real server (429 with Retry-After beyond a key's limits, other keys unaffected)."""

import asyncio
import json

import httpx
import pytest

from engine.async_engine import AsyncLLM
from server.app import create_app
from server.config import ServerConfig
from server.errors import APIError
from server.tenants import Tenant, Tenants, load_keys
from tests.server.conftest import tiny_engine_config
from tests.server.helpers import SlowEngine, ThreadedServer

CHAT = "/v1/chat/completions"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_refills_and_says_when_to_retry():
    clock = Clock()
    tenant = Tenant("t", tokens_per_minute=600)  # 10 tokens per second
    tenants = Tenants({"k": tenant}, clock=clock)
    lease = tenants.admit(tenant, 500)
    lease.release(100, ran=True)  # 600 used: the bucket is empty
    with pytest.raises(APIError) as refused:
        tenants.admit(tenant, 50)
    assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "5"
    clock.now = 5.0
    tenants.admit(tenant, 50).release(0, ran=True)
    with pytest.raises(APIError) as too_big:  # can never pass: a 400, not a retry
        tenants.admit(tenant, 601)
    assert too_big.value.status == 400 and "more than key 't' may use per minute" in too_big.value.message
    clock.now = 1000.0  # refills up to the bucket's size only
    refused_by_engine = tenants.admit(tenant, 600)
    with pytest.raises(APIError):
        tenants.admit(tenant, 1)
    refused_by_engine.release(0, ran=False)  # e.g. a 503 queue_full: the prompt is refunded
    tenants.admit(tenant, 600)


def test_concurrency_slots_are_returned_once():
    tenant = Tenant("t", max_concurrent=2)
    tenants = Tenants({"k": tenant})
    a, b = tenants.admit(tenant, 1), tenants.admit(tenant, 1)
    with pytest.raises(APIError) as refused:
        tenants.admit(tenant, 1)
    assert refused.value.headers["Retry-After"] == "1"
    a.release(0, ran=True)
    a.release(0, ran=True)  # a second release gives nothing back
    tenants.admit(tenant, 1)
    with pytest.raises(APIError):
        tenants.admit(tenant, 1)
    b.release(0, ran=True)


def test_authentication_finds_the_tenant():
    tenants = Tenants.from_options("single", None)
    assert tenants.authenticate("Bearer single").name == "default"
    for header in ("", "Bearer nope", "Basic single"):
        with pytest.raises(APIError) as e:
            tenants.authenticate(header)
        assert e.value.status == 401
    assert Tenants().authenticate("").name == "anonymous"


@pytest.mark.parametrize("content,problem", [
    ("{", "JSONDecodeError"), ('{"keys": {}}', "'keys' must be a list"), ('{"keys": [{}]}', "KeyError"),
    ('{"keys": [{"key": ""}]}', "non-empty"), ('{"keys": [{"key": "a", "max_concurrent": -1}]}', ">= 0"),
    ('{"keys": [{"key": "a"}, {"key": "a"}]}', "duplicate key"),
    ('{"keys": [{"key": "a", "name": "t"}, {"key": "b", "name": "t"}]}', "duplicate name"),
])
def test_a_bad_keys_file_is_refused_with_its_problem(tmp_path, content, problem):
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=problem):
        load_keys(path)


@pytest.fixture
def limited_server(tiny_model_dir, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [
        {"key": "sk-busy", "name": "busy", "max_concurrent": 2},
        {"key": "sk-small", "name": "small", "tokens_per_minute": 120},
        {"key": "sk-free", "name": "free"}]}))
    config = ServerConfig(engine=tiny_engine_config(tiny_model_dir, max_num_seqs=16),
                          api_keys_file=str(keys))
    server = ThreadedServer(create_app(config, AsyncLLM(config.engine, engine_factory=SlowEngine))).start()
    yield server
    server.stop()


def chat(max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "ignore_eos": True}


def test_per_key_limits_under_concurrent_clients(limited_server):
    async def burst(key: str, n: int, max_tokens: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=limited_server.url, timeout=60,
                                     headers={"Authorization": f"Bearer {key}"}) as client:
            return await asyncio.gather(*(client.post(CHAT, json=chat(max_tokens)) for _ in range(n)))

    async def all_keys():
        return await asyncio.gather(burst("sk-busy", 8, 20), burst("sk-free", 8, 20))

    busy, free = asyncio.run(all_keys())
    statuses = sorted(r.status_code for r in busy)
    assert statuses.count(200) >= 2 and 429 in statuses, statuses  # 2 at a time, the rest refused
    for r in busy:
        if r.status_code == 429:
            assert r.headers["Retry-After"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert "busy" in r.json()["error"]["message"]
    assert [r.status_code for r in free] == [200] * 8  # another key is not held back
    # tokens per minute: one request of ~20 prompt + 100 completion tokens empties the bucket
    small = asyncio.run(burst("sk-small", 1, 100))[0]
    assert small.status_code == 200
    again = asyncio.run(burst("sk-small", 1, 4))[0]
    assert again.status_code == 429 and int(again.headers["Retry-After"]) >= 2
    assert "tokens per minute" in again.json()["error"]["message"]
    assert limited_server.app.state.server.engine.num_in_flight == 0
