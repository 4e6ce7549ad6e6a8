"""The soak benchmark's short variant: 25 s of mixed traffic (streams, drops, long prompts,
n = 2, client timeouts, bad inputs) against the tiny model: no unexpected error, no KV block
left referenced, bounded memory, still healthy."""

import asyncio
import os

from bench.soak import Soak
from tests.server.conftest import API_KEY


def test_short_soak(tiny_server):
    soak = Soak(tiny_server.url, seconds=15, clients=6, api_key=API_KEY, pid=os.getpid(),
                long_prompt_words=60, max_tokens=24, seed=1)
    result = asyncio.run(soak.run(sample_every=1.0))
    summary = result.summary()
    assert result.errors == 0, result.error_examples
    assert summary["requests"] > 60 and set(result.requests) == {
        "stream", "stream_dropped", "short", "long_prompt", "bad_input", "n2", "client_timeout"}
    assert result.kv_blocks_leaked == 0
    assert result.healthy_after
    # RSS (this process holds the server) grows while the preallocated KV pool's pages are
    # first touched, and is bounded by it
    pool_mb = tiny_server.app.state.server.config.engine.cache.kv_cache_bytes / 2**20
    print(summary)
    assert summary["rss_end_mb"] < summary["rss_start_mb"] + pool_mb + 200
    assert tiny_server.app.state.server.engine.num_in_flight == 0
