"""Every documented OpenAI request field is honoured or refused with a 400 naming it; none is
silently dropped (tiny model, in-process server). The field lists are OpenAI's API reference
for chat completions and (legacy) completions; a field missing from our tables fails the test."""

import json

import pytest

from server.protocol import ChatCompletionRequest, CompletionRequest

CHAT_FIELDS = {
    "messages", "model", "audio", "frequency_penalty", "function_call", "functions", "logit_bias",
    "logprobs", "max_completion_tokens", "max_tokens", "metadata", "modalities", "n",
    "parallel_tool_calls", "prediction", "presence_penalty", "prompt_cache_key", "reasoning_effort",
    "response_format", "safety_identifier", "seed", "service_tier", "stop", "store", "stream",
    "stream_options", "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user",
    "verbosity", "web_search_options",
}
COMPLETION_FIELDS = {
    "model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens",
    "n", "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature",
    "top_p", "user",
}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
COMPLETION = {"prompt": "hello", "max_tokens": 4, "temperature": 0}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}

# (field, value): accepted and honoured (200); the checks below verify the effect of those
# that change the output.
HONOURED = {
    "chat": [
        ("messages", [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]),
        ("model", None), ("frequency_penalty", 1.0), ("presence_penalty", -1.0), ("logit_bias", {"5": 100}),
        ("logprobs", True), ("max_completion_tokens", 3), ("max_tokens", 2), ("metadata", {"k": "v"}),
        ("modalities", ["text"]), ("n", 3), ("prompt_cache_key", "abc"), ("response_format", {"type": "text"}),
        ("safety_identifier", "u1"), ("seed", 3), ("service_tier", "auto"), ("stop", ["zz", "yy"]),
        ("store", False), ("stream", True), ("stream_options", None), ("temperature", 0.7),
        ("tool_choice", "none"), ("top_p", 0.9), ("user", "someone"),
        ("response_format", {"type": "json_object"}),
        ("response_format", {"type": "json_schema", "json_schema": {"name": "v", "strict": True, "schema": {
            "type": "object", "properties": {"v": {"type": "integer"}}, "required": ["v"]}}}),
        ("guided_regex", "[a-c]+"), ("guided_choice", ["yes", "no"]),
        ("tools", [TOOL]), ("parallel_tool_calls", False),
        ("prediction", {"type": "content", "content": "x"}),
        ("prediction", {"type": "content", "content": [{"type": "text", "text": "x"}]}),
    ],
    "completions": [
        ("model", None), ("prompt", [1, 2, 3]), ("best_of", 1), ("echo", True), ("frequency_penalty", 2.0),
        ("logit_bias", {"7": 100}), ("logprobs", 2), ("max_tokens", 3), ("n", 2), ("presence_penalty", 2.0),
        ("seed", 1), ("stop", "zz"), ("stream", True), ("stream_options", None), ("suffix", ""),
        ("temperature", 1.5), ("top_p", 0.5), ("user", "someone"),
        ("guided_json", {"type": "object"}), ("response_format", {"type": "json_object"}),
        ("prediction", {"type": "content", "content": "hello"}),
    ],
}
# (field, value): refused, 400 with param == field (unsupported, or an invalid value)
REFUSED = {
    "chat": [
        ("audio", {"voice": "alloy", "format": "wav"}), ("function_call", "auto"), ("functions", [TOOL["function"]]),
        ("prediction", {"type": "text", "content": "x"}),
        ("prediction", {"type": "content", "content": [{"type": "image_url"}]}), ("tools", [{"type": "function"}]),
        ("tool_choice", {"type": "function", "function": {"name": "nope"}}),
        ("reasoning_effort", "low"), ("response_format", {"type": "xml"}),
        ("response_format", {"type": "json_schema", "json_schema": {"name": "v", "schema": {"type": "nope"}}}),
        ("response_format", {"type": "json_schema", "json_schema": "not an object"}),
        ("guided_regex", "(unclosed"), ("guided_choice", []), ("guided_json", {"type": 5}),
        ("tool_choice", "required"), ("verbosity", "low"), ("web_search_options", {}),
        ("modalities", ["text", "audio"]), ("n", 129), ("n", 0), ("top_logprobs", 3),  # without logprobs
        ("frequency_penalty", 2.5), ("presence_penalty", "1"), ("logit_bias", {"x": 1}),
        ("logit_bias", {"5": 101}), ("logit_bias", {"999999": 1}), ("max_completion_tokens", 0),
        ("stop", ["a", "b", "c", "d", "e"]), ("temperature", -1), ("top_p", 0), ("seed", -1),
        ("service_tier", "priority"), ("stream_options", {"include_usage": True}),  # without stream
        ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        ("logprobs", "yes"),
    ],
    "completions": [
        ("best_of", 3), ("suffix", "tail"), ("logprobs", 6), ("n", 200), ("frequency_penalty", -3),
        ("prompt", ["a", "b"]), ("stop", ["a", "b", "c", "d", "e"]), ("echo", "no"),
    ],
}
TOP_LOGPROBS_OK = ("top_logprobs", 3)


def _post(client, endpoint, field, value):
    base, path = (CHAT, "/v1/chat/completions") if endpoint == "chat" else (COMPLETION, "/v1/completions")
    body = {**base, field: value}
    if field == "stream_options" and value is None:
        body = {**base, "stream": True, "stream_options": {"include_usage": True}}
    if field == "model" and value is None:
        body.pop("model")
    return client.post(path, json=body)


def test_every_documented_field_is_in_a_table_and_a_declared_field():
    for endpoint, documented, model in (("chat", CHAT_FIELDS, ChatCompletionRequest),
                                        ("completions", COMPLETION_FIELDS, CompletionRequest)):
        tabled = {f for f, _ in HONOURED[endpoint] + REFUSED[endpoint]} | {"top_logprobs"} & documented
        assert documented - tabled == set(), f"{endpoint}: fields without a test"
        # a declared field is parsed (and so honoured or refused), never dropped as an extra
        assert documented - set(model.model_fields) == set()


@pytest.mark.parametrize("endpoint,field,value", [(e, f, v) for e in HONOURED for f, v in HONOURED[e]])
def test_honoured_fields_answer_200(tiny_client, endpoint, field, value):
    r = _post(tiny_client, endpoint, field, value)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("endpoint,field,value", [(e, f, v) for e in REFUSED for f, v in REFUSED[e]])
def test_refused_fields_name_themselves(tiny_client, endpoint, field, value):
    r = _post(tiny_client, endpoint, field, value)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field, error
    assert error["type"] == "invalid_request_error"


def test_effects_of_honoured_fields(tiny_client):
    """The fields that change the output do change it (the tiny model is random, so forced
    tokens and lengths are what is checked)."""
    chat = "/v1/chat/completions"
    forced = tiny_client.post(chat, json={**CHAT, "logit_bias": {"5": 100}, "logprobs": True,
                                          "top_logprobs": 2}).json()
    content = forced["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and all(len(t["top_logprobs"]) == 2 for t in content)
    ids = tiny_client.post("/tokenize", json={"prompt": "".join(t["token"] for t in content),
                                              "add_special_tokens": False}).json()["tokens"]
    assert set(ids) == {5}  # the bias forced token 5 at every position
    assert all(t["logprob"] == pytest.approx(0.0, abs=1e-3) for t in content)
    assert tiny_client.post(chat, json={**CHAT, "max_completion_tokens": 3, "max_tokens": 9}
                            ).json()["usage"]["completion_tokens"] == 3
    scored = tiny_client.post("/v1/completions", json={**COMPLETION, "echo": True, "logprobs": 2}).json()
    lp = scored["choices"][0]["logprobs"]
    prompt_len = scored["usage"]["prompt_tokens"]
    assert len(lp["tokens"]) == prompt_len + 4  # the echoed prompt's tokens, then the output's
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v is not None for v in lp["token_logprobs"][1:])
    assert scored["choices"][0]["text"].startswith("hello")
    echoed = tiny_client.post("/v1/completions", json={**COMPLETION, "echo": True}).json()
    assert echoed["choices"][0]["text"].startswith("hello")
    lp = tiny_client.post("/v1/completions", json={**COMPLETION, "logprobs": 2}).json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    assert lp["text_offset"][0] == 0 and all(len(t) <= 2 for t in lp["top_logprobs"])


def test_streamed_logprobs_equal_whole(tiny_client):
    body = {**CHAT, "max_tokens": 12, "logprobs": True, "top_logprobs": 3}
    whole = tiny_client.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]["content"]
    from tests.server.helpers import parse_sse

    with tiny_client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        events, done = parse_sse(list(r.iter_lines()))
    streamed = [t for e in events for c in e["choices"] if c.get("logprobs") for t in c["logprobs"]["content"]]
    assert done and streamed == whole


def test_tokenize_and_detokenize(tiny_client):
    ids = tiny_client.post("/tokenize", json={"prompt": "hello world"}).json()
    assert ids["count"] == len(ids["tokens"]) > 0 and ids["max_model_len"] == 512
    text = tiny_client.post("/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"]
    assert "hello world" in text
    chat = tiny_client.post("/tokenize", json={"messages": CHAT["messages"]}).json()
    usage = tiny_client.post("/v1/chat/completions", json=CHAT).json()["usage"]
    assert chat["count"] == usage["prompt_tokens"]
    assert tiny_client.post("/tokenize", json={}).status_code == 400
    assert tiny_client.post("/detokenize", json={"tokens": [10**9]}).json()["error"]["param"] == "tokens"


def test_n_choices_whole_and_streamed(tiny_client):
    """n choices: indexes 0..n-1, seeded choice i equals a single request with seed + i, usage
    counts the prompt once; the stream carries every choice, each with its own finish."""
    body = {**CHAT, "max_tokens": 8, "temperature": 1.0, "seed": 40, "n": 3}
    whole = tiny_client.post("/v1/chat/completions", json=body).json()
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2]
    singles = [tiny_client.post("/v1/chat/completions", json={**body, "n": 1, "seed": 40 + i}).json()
               for i in range(3)]
    assert [c["message"]["content"] for c in whole["choices"]] == [
        s["choices"][0]["message"]["content"] for s in singles]
    assert whole["usage"]["prompt_tokens"] == singles[0]["usage"]["prompt_tokens"]
    assert whole["usage"]["completion_tokens"] == sum(s["usage"]["completion_tokens"] for s in singles)
    from tests.server.helpers import parse_sse

    with tiny_client.stream("POST", "/v1/chat/completions",
                            json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        events, done = parse_sse(list(r.iter_lines()))
    assert done and events[-1]["usage"] == whole["usage"]
    for i in range(3):
        text = "".join(c["delta"].get("content", "") for e in events for c in e["choices"] if c["index"] == i)
        assert text == whole["choices"][i]["message"]["content"]
        assert sum(1 for e in events for c in e["choices"] if c["index"] == i and c["finish_reason"]) == 1


def test_structured_outputs_parse(tiny_client):
    """The tiny model is random: what it writes under a schema is valid only thanks to the grammar."""
    schema = {"type": "object", "additionalProperties": False, "required": ["ok", "n"],
              "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "strict": True, "schema": schema}}
    body = {**CHAT, "max_tokens": 64, "response_format": fmt}
    whole = tiny_client.post("/v1/chat/completions", json=body).json()["choices"][0]
    value = json.loads(whole["message"]["content"])
    assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and value["n"] in (1, 2, 3)
    assert whole["finish_reason"] == "stop"
    with tiny_client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) \
        == whole["message"]["content"]
    text = tiny_client.post("/v1/completions", json={**COMPLETION, "max_tokens": 16,
                                                     "guided_regex": "[0-9]{4}"}).json()["choices"][0]["text"]
    assert len(text) == 4 and text.isdigit()
