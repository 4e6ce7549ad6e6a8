"""The OpenAI surface on the real default model (fp32, speculating with the shipped DSpark
drafter), through the official `openai` client: logprobs equal with and without speculation and
equal to the target's own log-softmax, logit_bias, penalties, roles, per-request speculation."""

import json

import openai
import pytest

from scheduler import SamplingParams
from tests.server.helpers import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def fixed_server(tmp_path_factory):
    """The real model speculating with the shipped DSpark drafter under the fixed policy (γ
    drafts verified every step), so the speculative requests here always verify drafts: the
    scheduled policy may rest its drafter on a loaded machine."""
    log = tmp_path_factory.mktemp("fixed-server") / "server.log"
    proc = ServerProcess(["--device", "cpu", "--dtype", "float32", "--verify-policy", "fixed",
                          "--kv-cache-bytes", str(256 << 20), "--max-num-seqs", "16"], log)
    try:
        yield proc.wait_healthy()
    finally:
        proc.terminate()


@pytest.fixture(scope="module")
def oai(fixed_server):
    return openai.OpenAI(base_url=f"{fixed_server.url}/v1", api_key="unused", timeout=300)


def _chat(oai, speculative: bool, stream: bool, **fields):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                  logprobs=True, top_logprobs=3, extra_body={"speculative": speculative}, **fields)
    if not stream:
        r = oai.chat.completions.create(**kwargs)
        return r.choices[0].message.content, r.choices[0].logprobs.content, r.usage
    chunks = list(oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    lps = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    return text, lps, chunks[-1].usage


def test_logprobs_equal_with_and_without_speculation_and_the_targets_log_softmax(oai, default_llm):
    ref = default_llm.chat(MESSAGES, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))[0]
    prompt = default_llm.encode_chat(MESSAGES)
    logp = default_llm.prompt_logits(prompt + ref.token_ids).log_softmax(-1)[len(prompt) - 1:-1]
    tokenizer = default_llm.tokenizer
    results = {(spec, stream): _chat(oai, spec, stream) for spec in (True, False) for stream in (True, False)}
    for (spec, stream), (text, lps, usage) in results.items():
        assert text == ref.text, (spec, stream)
        assert len(lps) == len(ref.token_ids)
        for k, (token_id, lp) in enumerate(zip(ref.token_ids, lps)):
            assert bytes(lp.bytes) == tokenizer.token_bytes(token_id)
            assert lp.logprob == pytest.approx(logp[k, token_id].item(), abs=1e-4)
            top = logp[k].topk(3)
            assert [t.logprob for t in lp.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        spec_usage = usage.model_extra.get("speculative_decoding") if usage.model_extra else None
        if spec:
            assert spec_usage and spec_usage["rounds"] > 0  # the drafter did verify tokens
            assert spec_usage["mean_acceptance_length"] >= 1.0
        else:
            assert spec_usage is None  # switched off for this request: no drafts at all


@pytest.mark.parametrize("speculative,stream", [(True, False), (False, False), (True, True)])
def test_logit_bias_forces_a_token(oai, default_llm, speculative, stream):
    token_id = default_llm.tokenizer.encode(" ocean")[0]
    kwargs = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "logit_bias": {str(token_id): 100},
                  "extra_body": {"speculative": speculative}}
    if stream:
        chunks = oai.chat.completions.create(stream=True, **kwargs)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        text = oai.chat.completions.create(**kwargs).choices[0].message.content
    assert text == " ocean" * 6


def _repeat_rate(oai, **fields) -> float:
    """Share of generated tokens that repeat an earlier generated token."""
    r = oai.completions.create(model=MODEL, prompt="one two one two one two one two", max_tokens=48,
                               temperature=0, logprobs=0, **fields)
    tokens = r.choices[0].logprobs.tokens
    return sum(t in tokens[:i] for i, t in enumerate(tokens)) / len(tokens)


@pytest.mark.parametrize("speculative", [True, False])
def test_frequency_penalty_lowers_repetition(oai, speculative):
    body = {"extra_body": {"speculative": speculative}}
    plain, penalised = _repeat_rate(oai, **body), _repeat_rate(oai, frequency_penalty=2.0, **body)
    assert plain > 0.8  # the prompt makes greedy decoding loop
    assert penalised < plain - 0.3, (plain, penalised)


def test_developer_role_is_system_and_tool_messages_render(oai, default_llm):
    as_system = [{"role": "system", "content": "Answer in French."}, *MESSAGES]
    as_developer = [{"role": "developer", "content": "Answer in French."}, *MESSAGES]
    ref = default_llm.chat(as_system, SamplingParams(max_tokens=12, temperature=0.0))[0].text
    r = oai.chat.completions.create(model=MODEL, messages=as_developer, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == ref
    with_tool = [*MESSAGES,
                 {"role": "assistant", "content": None, "tool_calls": [
                     {"id": "c1", "type": "function", "function": {"name": "sea", "arguments": "{}"}}]},
                 {"role": "tool", "tool_call_id": "c1", "content": "The sea is blue."}]
    r = oai.chat.completions.create(model=MODEL, messages=with_tool, max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > len(
        default_llm.encode_chat(MESSAGES))


def test_completion_logprobs_and_echo(oai, default_llm):
    prompt = "The capital of France is"
    r = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    ids = default_llm.tokenizer.encode(prompt, add_special_tokens=True)
    out = default_llm.generate(ids, SamplingParams(max_tokens=5, temperature=0.0))[0].token_ids
    logp = default_llm.prompt_logits(ids + out).log_softmax(-1)[len(ids) - 1:-1]
    assert lp.token_logprobs == pytest.approx([logp[k, t].item() for k, t in enumerate(out)], abs=1e-4)
    assert all(len(top) <= 2 and max(top.values()) >= v - 1e-6 for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert len(lp.tokens) == 5
    echoed = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + r.choices[0].text


@pytest.mark.parametrize("speculative", [True, False])
def test_echo_with_logprobs_scores_the_prompt(oai, default_llm, speculative):
    """echo + logprobs: the prompt's tokens come first, each with the raw log-softmax of the
    logits before it (the first has none), then the output's; streamed equals whole."""
    prompt = "The capital of France is"
    kwargs = {"model": MODEL, "prompt": prompt, "max_tokens": 5, "temperature": 0, "logprobs": 2, "echo": True,
                  "extra_body": {"speculative": speculative}}
    ids = default_llm.tokenizer.encode(prompt, add_special_tokens=True)
    out = default_llm.generate(ids, SamplingParams(max_tokens=5, temperature=0.0))[0].token_ids
    logp = default_llm.prompt_logits(ids + out).log_softmax(-1)
    expected = [None] + [logp[k - 1, t].item() for k, t in enumerate(ids + out) if k > 0]
    whole = oai.completions.create(**kwargs).choices[0]
    lp = whole.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expected[1:], abs=1e-4)
    assert all(max(top.values()) >= v - 1e-6 for top, v in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
    assert "".join(lp.tokens) == whole.text and whole.text.startswith(prompt)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(len(lp.tokens))]
    chunks = list(oai.completions.create(stream=True, **kwargs))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    offsets = [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    assert streamed == lp.token_logprobs and offsets == lp.text_offset


def test_n_choices_equal_single_requests_with_derived_seeds(oai):
    """Seeded sampling couples the drafter's draws to the target's (engine/sampler.py), so the
    tokens are the same with speculation on and off, alone or as choices of one request."""
    kwargs = {"model": MODEL, "messages": MESSAGES, "max_tokens": 24, "temperature": 0.8}
    texts = {}
    for spec in (True, False):
        body = {"extra_body": {"speculative": spec}}
        three = oai.chat.completions.create(n=3, seed=7, **kwargs, **body)
        singles = [oai.chat.completions.create(seed=7 + i, **kwargs, **body) for i in range(3)]
        texts[spec] = [c.message.content for c in three.choices]
        assert texts[spec] == [r.choices[0].message.content for r in singles]
        assert [c.index for c in three.choices] == [0, 1, 2]
        streamed = list(oai.chat.completions.create(n=3, seed=7, stream=True, **kwargs, **body))
        parts = ["", "", ""]
        for chunk in streamed:
            for c in chunk.choices:
                parts[c.index] += c.delta.content or ""
        assert parts == texts[spec]
        if spec:
            usage = three.usage.model_extra["speculative_decoding"]
            assert usage["rounds"] > 0 and usage["accepted_tokens"] > 0
    assert texts[True] == texts[False]
    assert len(set(texts[True])) > 1


def _reply(oai, speculative: bool, stream: bool, **fields) -> tuple[str, str | None, int]:
    """(text, finish_reason, completion_tokens) of one chat completion, whole or streamed."""
    extra = {**fields.pop("extra_body", {}), "speculative": speculative}
    kwargs = dict(model=MODEL, extra_body=extra, **{"messages": MESSAGES, **fields})
    if not stream:
        r = oai.chat.completions.create(**kwargs)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens
    chunks = list(oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
    return text, finish, chunks[-1].usage.completion_tokens


def _repeats(text: str) -> float:
    words = text.split()
    return sum(w in words[:i] for i, w in enumerate(words)) / max(1, len(words))


@pytest.mark.parametrize("speculative,stream", [(True, False), (False, False), (True, True), (False, True)])
def test_sampling_fields_with_the_official_client(oai, speculative, stream):
    """The sampling fields the other tests do not reach, each with an effect that can fail."""
    greedy = _reply(oai, speculative, stream, max_tokens=24, temperature=0)
    # min_p = 1 keeps only the most likely token: sampling at T = 1 is greedy decoding
    assert _reply(oai, speculative, stream, max_tokens=24, temperature=1.0, seed=3,
                  extra_body={"min_p": 1.0})[0] == greedy[0]
    text, finish, used = _reply(oai, speculative, stream, max_completion_tokens=3, temperature=0, user="tenant-1")
    assert used == 3 and finish == "length" and greedy[0].startswith(text)
    stops = [".", ",", "\n", "!"]
    text, finish, _ = _reply(oai, speculative, stream, max_tokens=64, temperature=0, stop=stops)
    assert finish == "stop" and not any(s in text for s in stops) and greedy[0].startswith(text)
    loop = [{"role": "user", "content": "Repeat after me forever: sea sea sea sea sea sea sea sea"}]
    plain = _repeats(_reply(oai, speculative, stream, max_tokens=40, temperature=0, messages=loop)[0])
    for penalty in ({"presence_penalty": 2.0}, {"extra_body": {"repetition_penalty": 1.8}}):
        penalised = _repeats(_reply(oai, speculative, stream, max_tokens=40, temperature=0, messages=loop,
                                    **penalty)[0])
        assert penalised < plain - 0.2, (penalty, plain, penalised)


def test_structured_output_is_the_same_with_and_without_speculation(oai):
    """response_format json_schema on the real model: valid JSON of the schema, and the drafts
    the grammar refuses are rejected in verification, so greedy output does not change."""
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "country", "population"],
              "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20},
                             "population": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "strict": True, "schema": schema}}
    messages = [{"role": "user", "content": "Describe Paris as JSON with city, country and population."}]
    outs = {}
    for spec in (True, False):
        r = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=64, temperature=0,
                                        response_format=fmt, extra_body={"speculative": spec})
        outs[spec] = r.choices[0].message.content
        value = json.loads(outs[spec])
        assert set(value) == {"city", "country", "population"} and isinstance(value["population"], int)
        if spec:
            assert r.usage.model_extra["speculative_decoding"]["rounds"] > 0
    assert outs[True] == outs[False]


def test_tool_calls_with_the_official_client(oai):
    """The default model's template has no tools: the JSON fallback, `required` enforced by the
    grammar; the call round-trips as history and the model answers from the result."""
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                       "required": ["city"], "additionalProperties": False}}}
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    for stream in (False, True):
        # one call: with parallel calls allowed, this small model repeats the same call
        kwargs = {"model": MODEL, "messages": messages, "tools": [weather], "tool_choice": "required", "max_tokens": 64,
                      "temperature": 0, "parallel_tool_calls": False}
        if stream:
            chunks = list(oai.chat.completions.create(stream=True, **kwargs))
            calls = [c for ch in chunks if ch.choices for c in ch.choices[0].delta.tool_calls or []]
            finish = chunks[-1].choices[0].finish_reason
        else:
            r = oai.chat.completions.create(**kwargs)
            calls, finish = r.choices[0].message.tool_calls, r.choices[0].finish_reason
        assert finish == "tool_calls" and len(calls) == 1 and calls[0].function.name == "get_weather"
        assert set(json.loads(calls[0].function.arguments)) == {"city"}
    answer = oai.chat.completions.create(model=MODEL, tools=[weather], max_tokens=32, temperature=0, messages=[
        *messages, {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "Sunny, 21 C"}])
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")


CODE = '''def mean(values):
    total = 0
    for v in values:
        total += v
    return total / len(values)
'''


def test_predicted_outputs_change_speed_only(oai):
    """A code edit with the code as prediction: the output equals the request without it, the
    prediction's drafts are accepted (streamed usage too), and a wrong prediction changes
    nothing but its counts."""
    messages = [{"role": "user", "content": f"Rename the function to average. Reply with the code only.\n\n{CODE}"}]

    def ask(stream: bool = False, **fields):
        kwargs = dict(model=MODEL, messages=messages, max_tokens=48, temperature=0, **fields)
        if not stream:
            r = oai.chat.completions.create(**kwargs)
            return r.choices[0].message.content, r.usage
        chunks = list(oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage

    plain, usage = ask()
    assert usage.completion_tokens_details is None
    for prediction, good, stream in ((plain, True, True), (CODE, True, False), ("The quick brown fox. " * 8, False, False)):
        text, usage = ask(stream, prediction={"type": "content", "content": prediction})
        assert text == plain
        details = usage.completion_tokens_details
        assert details is not None
        if good:
            assert details.accepted_prediction_tokens > 0
        assert details.accepted_prediction_tokens <= usage.completion_tokens
