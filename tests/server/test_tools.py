"""Tool calls: validation, both output formats parsed, `required` and named choices enforced by
the grammar (on the tiny random model, which alone never writes a call), streamed as
`delta.tool_calls`, and the default model calling a tool through the official client."""

import json

import pytest

from scheduler import InvalidRequest
from server.tools import constraint, history_calls, parse, render, tool_plan

# tiny: the tiny model's byte tokenizer spends a token per character of the tool listing
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "required": ["city"], "additionalProperties": False,
    "properties": {"city": {"enum": ["P", "R"]}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "required": ["zone"], "additionalProperties": False, "properties": {"zone": {"enum": ["U"]}}}}}
CHAT = {"messages": [{"role": "user", "content": "weather?"}], "max_tokens": 64, "temperature": 0}


def test_plans_validate_choices():
    assert tool_plan(None, None, None, "") is None and tool_plan([WEATHER], "none", None, "") is None
    plan = tool_plan([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}, None, "")
    assert plan.choice == "get_time" and not plan.hermes and plan.parallel
    assert tool_plan([WEATHER], None, False, "{% if tools %}").hermes
    for tools, choice, param in (([WEATHER], {"type": "function", "function": {"name": "x"}}, "tool_choice"),
                                 (None, "required", "tool_choice"), ([{"type": "function"}], "auto", "tools"),
                                 ([WEATHER], "sometimes", "tool_choice")):
        with pytest.raises(InvalidRequest) as e:
            tool_plan(tools, choice, None, "")
        assert e.value.param == param


def test_both_formats_parse_and_anything_else_is_content():
    plan = tool_plan([WEATHER], "auto", None, "")
    content, calls = parse(plan, '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "R"}}]}')
    assert content is None and calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "R"}
    for text in ('{"tool_calls": [{"name": "unknown", "arguments": {}}]}', "It is sunny.", '{"a": 1}', "{"):
        assert parse(plan, text) == (text, [])
    hermes = tool_plan([WEATHER, TIME], "auto", None, "tools")
    content, calls = parse(hermes, 'Let me check.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}'
                                   '\n</tool_call>\n<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>')
    assert content == "Let me check." and [c["function"]["name"] for c in calls] == ["get_time", "get_weather"]
    single = tool_plan([WEATHER, TIME], "auto", False, "tools")
    assert len(parse(single, "<tool_call>{\"name\": \"get_time\"}</tool_call>" * 2)[1]) == 1


def test_rendering_and_constraints_compile(tiny_model_dir):
    from engine.grammar import GrammarCompiler
    from engine.loader import load_checkpoint

    compiler = GrammarCompiler(load_checkpoint(str(tiny_model_dir)).tokenizer, 259)
    for template in ("", "tools"):
        for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
            for parallel in (True, False):
                compiler.check(constraint(tool_plan([WEATHER, TIME], choice, parallel, template)))
    assert constraint(tool_plan([WEATHER], "auto", None, "")) is None
    messages, variables = render(tool_plan([WEATHER], "auto", None, ""), [{"role": "user", "content": "hi"}])
    assert messages[0]["role"] == "system" and "get_weather" in messages[0]["content"] and not variables
    assert render(tool_plan([WEATHER], "auto", None, "tools"), [])[1] == {"tools": [WEATHER]}
    written = history_calls([{"id": "c", "type": "function",
                              "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}])
    assert json.loads(written) == {"tool_calls": [{"name": "get_time", "arguments": {"zone": "UTC"}}]}


# (parallel "required" calls are left out: the random model would append calls until max_tokens)
@pytest.mark.parametrize("choice,parallel", [("required", False),
                                             ({"type": "function", "function": {"name": "get_time"}}, None)])
def test_forced_calls_follow_the_schemas(tiny_client, choice, parallel):
    body = {"messages": CHAT["messages"], "temperature": 0, "tools": [WEATHER, TIME], "tool_choice": choice}
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    resp = tiny_client.post("/v1/chat/completions", json=body).json()
    assert "choices" in resp, resp
    r = resp["choices"][0]
    assert r["finish_reason"] == "tool_calls" and r["message"]["content"] is None
    calls = r["message"]["tool_calls"]
    assert calls and all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    if parallel is False or isinstance(choice, dict):
        assert len(calls) == 1
    for c in calls:
        args = json.loads(c["function"]["arguments"])
        if isinstance(choice, dict):
            assert c["function"]["name"] == "get_time"
        props = (WEATHER if c["function"]["name"] == "get_weather" else TIME)["function"]["parameters"]["properties"]
        assert set(args) == set(props) and all(args[k] in props[k]["enum"] for k in args)
    with tiny_client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    streamed = [c for d in deltas for c in d.get("tool_calls") or []]
    assert [c["function"] for c in streamed] == [c["function"] for c in calls]
    assert [c["index"] for c in streamed] == list(range(len(calls)))
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_auto_without_a_call_streams_content(tiny_client):
    body = {**CHAT, "max_tokens": 12, "tools": [WEATHER]}
    whole = tiny_client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert whole["message"]["tool_calls"] is None and whole["finish_reason"] == "length"
    with tiny_client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == whole["message"]["content"]
    refused = tiny_client.post("/v1/chat/completions", json={**body, "logprobs": True})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs"
