"""The HTTP API on the tiny model (real uvicorn on a loopback port, in-process)."""

import asyncio
import threading
import time

import httpx
import openai
import pytest

from engine import LLMEngine
from engine.async_engine import AsyncLLM
from server.app import create_app
from server.config import ServerConfig
from server.serving import resolve_max_tokens
from tests.server.conftest import API_KEY, tiny_engine_config
from tests.server.helpers import (
    SlowEngine,
    ThreadedServer,
    metric,
    metric_samples,
    parse_sse,
    wait_healthy,
)

CHAT = {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 8, "temperature": 0}


def _stream(client: httpx.Client, path: str, body: dict) -> tuple[list[dict], bool]:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return parse_sse(list(r.iter_lines()))


def test_chat_non_streaming_shape(tiny_client, tiny_model_name, tiny_server):
    r = tiny_client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == tiny_model_name
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    tokenizer = tiny_server.app.state.server.engine.info.tokenizer
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(tokenizer.encode_chat(CHAT["messages"]))
    assert 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_stream_matches_non_stream(tiny_client):
    body = {**CHAT, "max_tokens": 12, "ignore_eos": True}
    whole = tiny_client.post("/v1/chat/completions", json=body).json()
    events, done = _stream(tiny_client, "/v1/chat/completions",
                           {**body, "stream_options": {"include_usage": True}})
    assert done
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert all(e["id"] == events[0]["id"] for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    *content, finish, usage = events
    assert finish["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                    "finish_reason": "length"}
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in content)
    assert text == whole["choices"][0]["message"]["content"]
    assert all(e["choices"][0]["finish_reason"] is None for e in content)


def test_stream_without_usage_has_no_usage_chunk(tiny_client):
    events, done = _stream(tiny_client, "/v1/chat/completions", CHAT)
    assert done and events[-1]["choices"][0]["finish_reason"] is not None
    assert all(e.get("usage") is None for e in events)


def test_completions_stream_and_whole(tiny_client):
    body = {"prompt": "abc", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    whole = tiny_client.post("/v1/completions", json=body).json()
    assert whole["object"] == "text_completion" and whole["id"].startswith("cmpl-")
    assert whole["usage"] == {"prompt_tokens": 3, "completion_tokens": 10, "total_tokens": 13,
                              "prompt_tokens_details": {"cached_tokens": 0}}
    events, done = _stream(tiny_client, "/v1/completions", body)
    assert done and events[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["text"] for e in events) == whole["choices"][0]["text"]
    ids = tiny_client.post("/v1/completions", json={**body, "prompt": [100, 101, 102]}).json()
    assert ids["usage"]["prompt_tokens"] == 3
    assert tiny_client.post("/v1/completions", json={**body, "prompt": ["abc"]}).json()[
        "choices"] == whole["choices"]


def test_stop_string_and_seed(tiny_client):
    base = {"prompt": "hello", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    text = tiny_client.post("/v1/completions", json=base).json()["choices"][0]["text"]
    stop = text[3:5]
    stopped = tiny_client.post("/v1/completions", json={**base, "stop": [stop]}).json()
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["text"] == text[:text.index(stop)]
    seeded = {**base, "temperature": 1.0, "seed": 1234}
    a, b = (tiny_client.post("/v1/completions", json=seeded).json() for _ in range(2))
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_default_max_tokens_chat_rest_of_context_completions_16(tiny_client, tiny_server):
    # The tiny model's context is 512 tokens; without max_tokens chat may use all of the rest,
    # completions 16 (OpenAI's and vLLM's default), capped by the context.
    r = tiny_client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 480}],
                                                        "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 512
    assert r.json()["choices"][0]["finish_reason"] == "length"
    for prompt, expected in (("x" * 100, 16), ("x" * 500, 12)):
        r = tiny_client.post("/v1/completions", json={"prompt": prompt, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == expected


def test_resolve_max_tokens():
    assert resolve_max_tokens(None, 10, 100, "prompt") == 90
    assert resolve_max_tokens(None, 10, 100, "prompt", default=16) == 16
    assert resolve_max_tokens(None, 90, 100, "prompt", default=16) == 10
    assert resolve_max_tokens(90, 10, 100, "prompt") == 90
    with pytest.raises(ValueError, match="at most 90 tokens"):
        resolve_max_tokens(91, 10, 100, "prompt")
    with pytest.raises(ValueError, match="maximum context length is 100"):
        resolve_max_tokens(None, 100, 100, "prompt")


def test_models_health_metrics(tiny_client, tiny_model_name):
    models = tiny_client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == tiny_model_name
    assert models["data"][0]["max_model_len"] == 512
    bare = httpx.Client(base_url=str(tiny_client.base_url))  # no API key: still open
    assert bare.get("/health").json() == {"status": "ok"}
    samples = metric_samples(bare.get("/metrics").text)
    assert ("dspark:spec_decode_num_draft_tokens_total",
            (("model_name", tiny_model_name),)) in samples
    assert metric(samples, "dspark:spec_decode_accepted_length_count") == 0


def test_openai_client_against_tiny(tiny_server, tiny_model_name):
    client = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key=API_KEY)
    whole = client.chat.completions.create(model=tiny_model_name, messages=CHAT["messages"],
                                           max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(
        model=tiny_model_name, messages=CHAT["messages"], max_tokens=8, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="wrong").models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=CHAT["messages"])
    two = client.chat.completions.create(model=tiny_model_name, messages=CHAT["messages"], n=2, max_tokens=4)
    assert [c.index for c in two.choices] == [0, 1]
    with pytest.raises(openai.BadRequestError, match="n must be at most 128"):
        client.chat.completions.create(model=tiny_model_name, messages=CHAT["messages"], n=129)


class _GatedEngine(LLMEngine):
    """Loads only once the test opens the gate, so the server is observably 'loading'."""

    gate = threading.Event()

    def __init__(self, config):
        assert self.gate.wait(60)
        super().__init__(config)


def test_503_while_loading_then_ready(tiny_model_dir):
    config = ServerConfig(engine=tiny_engine_config(tiny_model_dir))
    _GatedEngine.gate.clear()
    server = ThreadedServer(create_app(config, AsyncLLM(config.engine, _GatedEngine)))
    server.start(wait=False)
    try:
        for path, method in (("/health", "GET"), ("/v1/models", "GET"),
                             ("/v1/chat/completions", "POST")):
            r = _request_when_up(server.url, method, path)
            assert r.status_code == 503, (path, r.text)
            assert r.json()["error"]["code"] == "loading"
        _GatedEngine.gate.set()
        wait_healthy(server.url, 60)
        assert httpx.post(f"{server.url}/v1/chat/completions", json=CHAT).status_code == 200
    finally:
        _GatedEngine.gate.set()
        server.stop()


def _request_when_up(url: str, method: str, path: str) -> httpx.Response:
    for _ in range(200):
        try:
            return httpx.request(method, f"{url}{path}", json=CHAT if method == "POST" else None)
        except httpx.ConnectError:
            time.sleep(0.05)
    raise TimeoutError(url)



def test_full_waiting_queue_is_503_with_retry_after(tiny_model_dir):
    config = ServerConfig(engine=tiny_engine_config(tiny_model_dir, max_num_seqs=1, max_waiting=1))
    engine = AsyncLLM(config.engine, SlowEngine)
    server = ThreadedServer(create_app(config, engine)).start()
    long = {**CHAT, "max_tokens": 400, "ignore_eos": True}

    async def main() -> httpx.Response:
        async with (httpx.AsyncClient(base_url=server.url, timeout=60) as client,
                    client.stream("POST", "/v1/chat/completions",
                                  json={**long, "stream": True}) as running):
            # Keep a reference: a collected line iterator closes the response (a disconnect).
            lines = running.aiter_lines()
            await anext(lines)  # the request now holds the only running slot
            waiting = asyncio.create_task(client.post("/v1/chat/completions", json=long))
            deadline = time.monotonic() + 5
            while engine.stats.num_waiting < 1:
                assert time.monotonic() < deadline, "the second request never queued"
                await asyncio.sleep(0.01)
            refused = await client.post("/v1/chat/completions", json=CHAT)
            waiting.cancel()
        return refused

    try:
        refused = asyncio.run(main())
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
        assert "waiting queue is full" in refused.json()["error"]["message"]
    finally:
        server.stop()


def test_request_id_is_echoed_or_made_and_logged(tiny_client, caplog):
    import logging
    import re

    with caplog.at_level(logging.INFO, logger="server.requests"):
        mine = tiny_client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "trace-42:a.b"})
        made = tiny_client.get("/health")
        odd = tiny_client.get("/v1/models", headers={"X-Request-Id": "has spaces; and=" + "x" * 200})
    assert mine.status_code == 200 and mine.headers["x-request-id"] == "trace-42:a.b"
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    assert re.fullmatch(r"[0-9a-f]{32}", odd.headers["x-request-id"])
    logged = [r.getMessage() for r in caplog.records if r.name == "server.requests"]
    assert "trace-42:a.b POST /v1/chat/completions -> 200" in logged
    assert not any("hi there" in line for line in logged)  # never the prompt


def test_cors_is_off_by_default_and_limited_to_the_configured_origins(tiny_model_dir, tiny_client):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    off = tiny_client.options("/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in off.headers
    config = ServerConfig(engine=tiny_engine_config(tiny_model_dir), cors_origins=("https://app.example",))
    server = ThreadedServer(create_app(config)).start()
    try:
        wait_healthy(server.url, 60)
        with httpx.Client(base_url=server.url, timeout=60) as client:
            ok = client.options("/v1/chat/completions", headers=preflight)
            other = client.options("/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
            simple = client.get("/v1/models", headers={"Origin": "https://app.example"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
        assert "access-control-allow-origin" not in other.headers
        assert simple.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in simple.headers["access-control-expose-headers"].lower()
    finally:
        server.stop()
