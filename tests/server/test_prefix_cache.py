"""Prefix caching over HTTP (tiny model): cached tokens in usage, cache_salt isolation, the
metrics, and outputs equal to an uncached server's."""

import httpx
import pytest

from server.app import create_app
from server.config import ServerConfig
from tests.server.conftest import API_KEY, tiny_engine_config
from tests.server.helpers import ThreadedServer, metric, metric_samples

AUTH = {"Authorization": f"Bearer {API_KEY}"}
SHARED = [(37 * i + 11) % 200 + 5 for i in range(40)]  # 2 full blocks of 16, and a tail


def _complete(client: httpx.Client, prompt: list[int], **extra) -> dict:
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "temperature": 0,
                                             "ignore_eos": True, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_repeated_prefix_is_reported_as_cached_and_counted(tiny_client, tiny_server):
    before = metric_samples(httpx.get(f"{tiny_server.url}/metrics").text)
    first = _complete(tiny_client, SHARED + [1])
    again = _complete(tiny_client, SHARED + [2, 3])
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}
    after = metric_samples(httpx.get(f"{tiny_server.url}/metrics").text)
    hits = metric(after, "dspark:prefix_cache_hits_total") - metric(before, "dspark:prefix_cache_hits_total")
    queries = (metric(after, "dspark:prefix_cache_queries_total")
               - metric(before, "dspark:prefix_cache_queries_total"))
    assert hits == 32 and queries == 41 + 42
    assert metric(after, "dspark:kv_cache_blocks", state="referenced") == 0
    assert metric(after, "dspark:kv_cache_blocks", state="cached") >= 2


def test_cache_salt_keeps_tenants_apart(tiny_client):
    prompt = [t + 1 for t in SHARED]
    assert _complete(tiny_client, prompt, cache_salt="alice")["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert _complete(tiny_client, prompt + [9], cache_salt="bob")["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert _complete(tiny_client, prompt + [9])["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert _complete(tiny_client, prompt + [8], cache_salt="alice")["usage"]["prompt_tokens_details"]["cached_tokens"] == 32


@pytest.mark.parametrize("salt", ["", 5])
def test_a_bad_cache_salt_is_refused(tiny_client, salt):
    r = tiny_client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1, "cache_salt": salt})
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"


def test_outputs_equal_an_uncached_servers(tiny_model_dir, tiny_client):
    """Greedy continuations of prompts sharing prefixes, each run twice (the second time from
    the cache), equal those of a server with the cache off."""
    config = ServerConfig(engine=tiny_engine_config(tiny_model_dir, max_num_seqs=8, enable_prefix_caching=False),
                          api_key=API_KEY)
    prompts = [SHARED[:n] + [n, n + 1] for n in (17, 33, 40)] * 2
    uncached = ThreadedServer(create_app(config)).start()
    try:
        with httpx.Client(base_url=uncached.url, headers=AUTH, timeout=60) as plain:
            done = [_complete(plain, p, max_tokens=12) for p in prompts]
    finally:
        uncached.stop()
    want = [d["choices"][0]["text"] for d in done]
    assert all(d["usage"]["prompt_tokens_details"]["cached_tokens"] == 0 for d in done)
    got = [_complete(tiny_client, p, max_tokens=12) for p in prompts]
    assert [g["choices"][0]["text"] for g in got] == want
    assert sum(g["usage"]["prompt_tokens_details"]["cached_tokens"] for g in got) > 0
