"""End to end on the real default model: `dspark serve` on a loopback port, driven with httpx
and the official openai client, checked against the offline `LLM` API (fp32, greedy)."""

import asyncio

import httpx
import openai
import pytest

from scheduler import SamplingParams
from tests.server.helpers import metric, metric_samples, parse_sse
from tests.server.test_disconnect_and_drain import disconnect_streams, wait_engine_idle

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse pirate."},
     {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Arr, ahoy."},
     {"role": "user", "content": "Name three colours."}],
]
MAX_TOKENS = 24


def token_counts(usage: dict) -> dict:
    """Usage without `speculative_decoding`, whose figures depend on the load (the verify
    policy may rest the drafter), and `prompt_tokens_details`, whose cached tokens depend on
    what ran before (the prefix cache); the token counts do not."""
    return {k: v for k, v in usage.items() if k not in ("speculative_decoding", "prompt_tokens_details")}


def _stream_text(client: httpx.Client, path: str, body: dict) -> tuple[str, dict, str]:
    """Text, usage and finish reason of one streamed response (with include_usage)."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        events, done = parse_sse(list(r.iter_lines()))
    assert done
    text = "".join(c.get("delta", {}).get("content") or c.get("text") or ""
                   for e in events for c in e["choices"])
    finish = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert len(finish) == 1 and events[-1]["choices"] == []
    return text, token_counts(events[-1]["usage"]), finish[0]


@pytest.fixture(scope="module")
def http(real_server):
    with httpx.Client(base_url=real_server.url, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def oai(real_server):
    return openai.OpenAI(base_url=f"{real_server.url}/v1", api_key="unused", timeout=300)


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["single-turn", "multi-turn"])
def test_chat_equals_llm_chat(http, oai, default_llm, messages):
    ref = default_llm.chat(messages, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))[0]
    expected_usage = {"prompt_tokens": len(default_llm.encode_chat(messages)),
                      "completion_tokens": len(ref.token_ids),
                      "total_tokens": len(default_llm.encode_chat(messages)) + len(ref.token_ids)}
    body = {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}

    whole = http.post("/v1/chat/completions", json=body).json()
    assert whole["choices"][0]["message"]["content"] == ref.text
    assert whole["choices"][0]["finish_reason"] == ref.finish_reason
    assert token_counts(whole["usage"]) == expected_usage
    assert _stream_text(http, "/v1/chat/completions", body) == (ref.text, expected_usage,
                                                                ref.finish_reason)

    sdk = oai.chat.completions.create(model=MODEL, messages=messages,
                                      max_completion_tokens=MAX_TOKENS, temperature=0)
    assert sdk.choices[0].message.content == ref.text
    assert sdk.usage.completion_tokens == len(ref.token_ids)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=messages,
                                              max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.prompt_tokens == expected_usage["prompt_tokens"]


def test_completions_equal_llm_generate(http, oai, default_llm):
    prompt = "The three primary colours are"
    ref = default_llm.generate(prompt, SamplingParams(max_tokens=16, temperature=0.0))[0]
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0}
    whole = http.post("/v1/completions", json=body).json()
    assert whole["choices"][0]["text"] == ref.text
    assert whole["usage"]["prompt_tokens"] == len(ref.prompt_token_ids)
    assert whole["usage"]["completion_tokens"] == len(ref.token_ids)
    text, usage, _ = _stream_text(http, "/v1/completions", body)
    assert text == ref.text and usage == token_counts(whole["usage"])
    sdk = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
    assert sdk.choices[0].text == ref.text


QUESTIONS = ["Name a fruit.", "What is 2+2?", "Say hello in French.", "Name a planet.",
             "What colour is the sky?", "Give me a synonym for happy.", "Count to five.",
             "What is the opposite of hot?"]


def test_64_concurrent_streams_equal_sequential(real_server, http):
    bodies = [{"model": MODEL, "messages": [{"role": "user", "content": q}], "max_tokens": 12,
               "temperature": 0} for q in QUESTIONS]
    sequential = [http.post("/v1/chat/completions", json=b).json() for b in bodies]

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, str, object]:
        stream = await client.chat.completions.create(
            **bodies[i % len(bodies)], stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return i, text, chunks[-1].usage

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{real_server.url}/v1", api_key="unused",
                                    timeout=600, max_retries=0)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(64)))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert len(results) == 64
    for i, text, usage in results:
        ref = sequential[i % len(bodies)]
        assert text == ref["choices"][0]["message"]["content"], (i, QUESTIONS[i % len(bodies)])
        # speculation statistics depend on the load; the token counts do not
        counts = {k: ref["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        assert usage.model_dump(exclude_none=True, exclude={"speculative_decoding", "prompt_tokens_details"}) == counts
    wait_engine_idle(real_server.url)


def test_20_disconnected_streams_free_everything(real_server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    dropped = asyncio.run(disconnect_streams(real_server.url, body, 20, {}))
    assert dropped == 20  # every client left mid-generation
    samples = wait_engine_idle(real_server.url, timeout=60)
    assert metric(samples, "dspark:num_requests_running") == 0
    assert metric(samples, "dspark:kv_cache_usage_ratio") == 0


def test_metrics_count_the_traffic(real_server, http):
    def scrape() -> dict:
        return metric_samples(http.get("/metrics").text)  # parsed by prometheus_client.parser

    before = scrape()
    n, max_tokens = 4, 10
    usages = [http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": f"Number {i}, go."}],
        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}).json()["usage"]
        for i in range(n)]
    after = scrape()

    def delta(name: str, **labels: str) -> float:
        return (metric(after, name, model_name=MODEL, **labels)
                - metric(before, name, model_name=MODEL, **labels))

    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_output_tokens_per_second"):
        assert delta(f"dspark:{name}_count") == n, name
    # one inter-token interval per decode step after the first token: a step that commits
    # accepted draft tokens too covers several tokens with one interval
    accepted = delta("dspark:spec_decode_num_accepted_tokens_total")
    itl_count = delta("dspark:inter_token_latency_seconds_count")
    assert n * (max_tokens - 1) - accepted <= itl_count <= n * (max_tokens - 1)
    assert delta("dspark:generation_tokens_total") == n * max_tokens
    assert delta("dspark:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("dspark:request_success_total", finish_reason="length") == n
    tok_s = delta("dspark:request_output_tokens_per_second_sum") / n
    ttft = delta("dspark:time_to_first_token_seconds_sum") / n
    itl = delta("dspark:inter_token_latency_seconds_sum") / itl_count
    assert 0.5 < tok_s < 5000 and 0 < ttft < 60 and 0 < itl < 10
    assert tok_s == pytest.approx(1 / itl, rel=0.5)  # decode speed and ITL tell one story
    # the default server speculates with the shipped DSpark drafter (scheduled verification)
    spec = {k: metric(after, f"dspark:spec_decode_num_{k}_tokens_total", model_name=MODEL)
            for k in ("draft", "verify", "accepted")}
    assert spec["draft"] > 0 and spec["accepted"] <= spec["verify"]
    assert ("dspark:spec_decode_verify_tokens_per_request_count",
            (("model_name", MODEL),)) in after
