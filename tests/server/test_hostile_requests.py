"""Malformed and hostile requests: each gets the right status in OpenAI's error shape, and the
server keeps serving afterwards."""

from dataclasses import dataclass, field

import httpx
import pytest

from tests.server.conftest import API_KEY, TINY_MAX_REQUEST_BYTES

CHAT_PATH, COMPLETIONS_PATH = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class Case:
    name: str
    status: int
    json: object = None  # a body to send as JSON...
    content: bytes | None = None  # ...or these raw bytes
    path: str = CHAT_PATH
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=lambda: dict(AUTH))
    param: str | None = None  # expected error.param, when it is worth pinning
    chunked: bool = False  # send `content` without a Content-Length


def chat(**fields: object) -> dict:
    return {"messages": USER, "max_tokens": 4, **fields}


CASES = [
    Case("bad json", 400, content=b'{"messages": [{"role": "user"'),
    Case("empty body", 400, content=b""),
    Case("json array body", 400, content=b"[1, 2, 3]"),
    Case("non-utf8 bytes", 400, content=b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'),
    Case("deeply nested json", 400, content=b"[" * 20000 + b"]" * 20000),
    Case("missing messages", 400, {"max_tokens": 4}, param="messages"),
    Case("empty messages", 400, {"messages": []}, param="messages"),
    Case("messages is a string", 400, {"messages": "hello"}, param="messages"),
    Case("message without role", 400, {"messages": [{"content": "hi"}]}),
    Case("unknown role", 400, {"messages": [{"role": "wizard", "content": "hi"}]}),
    Case("content is a number", 400, {"messages": [{"role": "user", "content": 42}]}),
    Case("empty user content", 400, {"messages": [{"role": "user", "content": ""}]},
         param="messages"),
    Case("image content part", 400, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}),
    Case("max_tokens wrong type", 400, chat(max_tokens="ten"), param="max_tokens"),
    Case("max_tokens negative", 400, chat(max_tokens=-5), param="max_tokens"),
    Case("max_tokens zero", 400, chat(max_tokens=0), param="max_tokens"),
    Case("huge max_tokens", 400, chat(max_tokens=10**12), param="max_tokens"),
    Case("huge max_completion_tokens", 400, chat(max_completion_tokens=100000),
         param="max_tokens"),
    Case("negative temperature", 400, chat(temperature=-1), param="temperature"),
    Case("temperature wrong type", 400, chat(temperature="hot"), param="temperature"),
    Case("top_p zero", 400, chat(top_p=0), param="top_p"),
    Case("top_p above one", 400, chat(top_p=1.5), param="top_p"),
    Case("negative top_k", 400, chat(top_k=-7), param="top_k"),
    Case("negative seed", 400, chat(seed=-1), param="seed"),
    Case("n=1000", 400, chat(n=1000), param="n"),
    Case("n=0", 400, chat(n=0), param="n"),
    Case("1000 stop strings", 400, chat(stop=[f"s{i}" for i in range(1000)]), param="stop"),
    Case("stop wrong type", 400, chat(stop=123)),
    Case("stream wrong type", 400, chat(stream="yes"), param="stream"),
    Case("stream_options without stream", 400, chat(stream_options={"include_usage": True}),
         param="stream_options"),
    Case("negative stop_token_ids", 400, chat(stop_token_ids=[-1]), param="stop_token_ids"),
    Case("unknown model", 404, chat(model="gpt-5"), param="model"),
    Case("missing api key", 401, chat(), headers={}),
    Case("wrong api key", 401, chat(), headers={"Authorization": "Bearer nope"}),
    Case("wrong auth scheme", 401, chat(), headers={"Authorization": f"Basic {API_KEY}"}),
    Case("oversize body", 413, content=b'{"x": "' + b"a" * (2 * TINY_MAX_REQUEST_BYTES) + b'"}'),
    Case("oversize chunked body", 413, content=b"a" * (2 * TINY_MAX_REQUEST_BYTES), chunked=True),
    Case("unknown route", 404, chat(), path="/v1/engines/davinci"),
    Case("wrong method", 405, path=CHAT_PATH, method="GET"),
    Case("prompt wrong type", 400, {"prompt": 5}, path=COMPLETIONS_PATH, param="prompt"),
    Case("prompt missing", 400, {"max_tokens": 3}, path=COMPLETIONS_PATH, param="prompt"),
    Case("empty prompt", 400, {"prompt": ""}, path=COMPLETIONS_PATH, param="prompt"),
    Case("token id out of vocab", 400, {"prompt": [10**9], "max_tokens": 2},
         path=COMPLETIONS_PATH, param="prompt"),
    Case("batched prompts", 400, {"prompt": ["a", "b"]}, path=COMPLETIONS_PATH, param="prompt"),
    Case("prompt longer than context", 400, {"prompt": "x" * 600, "max_tokens": 2},
         path=COMPLETIONS_PATH, param="prompt"),
    Case("unknown fields are ignored", 200, chat(frobnicate=True, logit_bias={"1": 2})),
    # sampling fields: wrong types and out-of-range values
    Case("top_p wrong type", 400, chat(top_p="most"), param="top_p"),
    Case("top_k wrong type", 400, chat(top_k=[1]), param="top_k"),
    Case("min_p above one", 400, chat(min_p=1.5), param="min_p"),
    Case("negative min_p", 400, chat(min_p=-0.1), param="min_p"),
    Case("presence_penalty too large", 400, chat(presence_penalty=3), param="presence_penalty"),
    Case("frequency_penalty too small", 400, chat(frequency_penalty=-3), param="frequency_penalty"),
    Case("repetition_penalty zero", 400, chat(repetition_penalty=0), param="repetition_penalty"),
    Case("seed wrong type", 400, chat(seed="lucky"), param="seed"),
    Case("n wrong type", 400, chat(n="two"), param="n"),
    Case("max_tokens float", 400, chat(max_tokens=2.5), param="max_tokens"),
    Case("max_tokens a list", 400, chat(max_tokens=[]), param="max_tokens"),
    Case("max_completion_tokens zero", 400, chat(max_completion_tokens=0), param="max_completion_tokens"),
    Case("logit_bias key not an id", 400, chat(logit_bias={"abc": 1}), param="logit_bias"),
    Case("logit_bias value wrong type", 400, chat(logit_bias={"1": "up"}), param="logit_bias"),
    Case("logit_bias id out of vocab", 400, chat(logit_bias={str(10**9): 1}), param="logit_bias"),
    Case("stop token id out of vocab", 400, chat(stop_token_ids=[10**9]), param="stop_token_ids"),
    Case("stop list of numbers", 400, chat(stop=[1, 2])),
    Case("ignore_eos wrong type", 400, chat(ignore_eos="sometimes"), param="ignore_eos"),
    Case("speculative wrong type", 400, chat(speculative={"on": 1}), param="speculative"),
    # logprobs
    Case("top_logprobs without logprobs", 400, chat(top_logprobs=3), param="top_logprobs"),
    Case("top_logprobs too large", 400, chat(logprobs=True, top_logprobs=21), param="top_logprobs"),
    Case("negative top_logprobs", 400, chat(logprobs=True, top_logprobs=-1), param="top_logprobs"),
    Case("completion logprobs too large", 400, {"prompt": "a", "logprobs": 6}, path=COMPLETIONS_PATH,
         param="logprobs"),
    # structured outputs and tools
    Case("response_format unknown type", 400, chat(response_format={"type": "yaml"}), param="response_format"),
    Case("json_schema without an object", 400, chat(response_format={"type": "json_schema", "json_schema": 3}),
         param="response_format"),
    Case("schema that does not compile", 400, chat(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}), param="response_format"),
    Case("two structured formats", 400, chat(guided_regex="a+", guided_choice=["a"])),
    Case("empty guided_choice", 400, chat(guided_choice=[]), param="guided_choice"),
    Case("regex that does not compile", 400, chat(guided_regex="(unclosed"), param="guided_regex"),
    Case("tools not a list", 400, chat(tools={"type": "function"}), param="tools"),
    Case("tool without a function", 400, chat(tools=[{"type": "function"}]), param="tools"),
    Case("tool_choice names a missing tool", 400, chat(
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        tool_choice={"type": "function", "function": {"name": "g"}}), param="tool_choice"),
    Case("logprobs with tools", 400, chat(logprobs=True, tools=[
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]), param="logprobs"),
    # fields refused rather than ignored
    Case("functions API", 400, chat(functions=[{"name": "f"}]), param="functions"),
    Case("audio output", 400, chat(audio={"voice": "alloy"}), param="audio"),
    Case("audio modality", 400, chat(modalities=["text", "audio"]), param="modalities"),
    Case("reasoning_effort", 400, chat(reasoning_effort="high"), param="reasoning_effort"),
    Case("best_of", 400, {"prompt": "a", "best_of": 3}, path=COMPLETIONS_PATH, param="best_of"),
    Case("suffix", 400, {"prompt": "a", "suffix": "b"}, path=COMPLETIONS_PATH, param="suffix"),
    # messages
    Case("tool message without content", 400, {"messages": [*USER, {"role": "tool", "tool_call_id": "1"}]},
         param="messages"),
    Case("content part without text", 400, {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
         param="messages"),
    Case("message is a list", 400, {"messages": [["user", "hi"]]}, param="messages"),
    # the utility endpoints
    Case("tokenize with neither field", 400, {}, path="/tokenize", param="prompt"),
    Case("tokenize with both fields", 400, {"prompt": "a", "messages": USER}, path="/tokenize", param="prompt"),
    Case("tokenize unknown model", 404, {"prompt": "a", "model": "gpt-5"}, path="/tokenize", param="model"),
    Case("detokenize missing tokens", 400, {}, path="/detokenize", param="tokens"),
    Case("detokenize id out of vocab", 400, {"tokens": [-1]}, path="/detokenize", param="tokens"),
    Case("detokenize tokens not ints", 400, {"tokens": ["a"]}, path="/detokenize", param="tokens"),
    Case("models with a POST", 405, {}, path="/v1/models"),
    Case("tokenize without a key", 401, {"prompt": "a"}, path="/tokenize", headers={}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_request(tiny_server, case: Case):
    kwargs: dict = {"headers": case.headers}
    if case.content is not None:
        kwargs["content"] = iter([case.content]) if case.chunked else case.content
    elif case.json is not None:
        kwargs["json"] = case.json
    r = httpx.request(case.method, f"{tiny_server.url}{case.path}", timeout=60, **kwargs)
    assert r.status_code == case.status, r.text
    if case.status == 200:
        return
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert "Traceback" not in r.text
    if case.param is not None:
        assert error["param"] == case.param, error
    if case.status == 401:
        assert r.headers["www-authenticate"] == "Bearer"


def test_context_error_says_the_limits(tiny_client):
    error = tiny_client.post(CHAT_PATH, json=chat(max_tokens=10**6)).json()["error"]
    assert "maximum context length is 512" in error["message"]
    assert "1000000" in error["message"]


def test_still_serving_after_hostile_requests(tiny_server, tiny_client):
    for case in CASES:  # the whole table once more, then a normal request
        kwargs = {"content": case.content} if case.content is not None else {"json": case.json}
        httpx.request(case.method, f"{tiny_server.url}{case.path}", headers=case.headers,
                      timeout=60, **kwargs)
    assert httpx.get(f"{tiny_server.url}/health").status_code == 200
    r = tiny_client.post(CHAT_PATH, json=chat(temperature=0))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    engine = tiny_server.app.state.server.engine
    assert engine.num_in_flight == 0
