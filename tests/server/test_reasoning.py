"""reasoning_content: think blocks split from content, whole and streamed at every cut."""

import json

import pytest

from server.reasoning import ReasoningSplitter, enabled, opens_in_prompt

CASES = [
    # (reply, starts inside the block, reasoning, content)
    ("<think>\nplan it</think>\n\nThe answer is 4.", False, "\nplan it", "The answer is 4."),
    ("  <think>a < b</think>done", False, "a < b", "done"),
    ("No thinking here <think>x</think>", False, None, "No thinking here <think>x</think>"),
    ("still thinking, cut by max_tokens", True, "still thinking, cut by max_tokens", ""),
    ("opened in the prompt</think>\nreply", True, "opened in the prompt", "reply"),
    ("<think>never closed", False, "never closed", ""),
    ("<thin", False, None, "<thin"),
    ("", False, None, ""),
]


@pytest.mark.parametrize("reply,inside,reasoning,content", CASES)
def test_whole_and_streamed_at_every_cut(reply, inside, reasoning, content):
    assert ReasoningSplitter(thinking=inside).split(reply) == (reasoning, content)
    for cut in range(len(reply) + 1):
        for second in range(cut, len(reply) + 1):
            s = ReasoningSplitter(thinking=inside)
            parts = [s.feed(reply[:cut]), s.feed(reply[cut:second]), s.feed(reply[second:]), s.flush()]
            assert "".join(r for r, _ in parts) == (reasoning or "")
            assert "".join(c for _, c in parts) == content


def test_when_the_parser_is_on():
    assert enabled("auto", "{% if x %}<think>{% endif %}") and not enabled("auto", "{{ messages }}")
    assert enabled("think", None) and not enabled("none", "<think>")
    with pytest.raises(ValueError):
        enabled("deepseek", None)
    assert opens_in_prompt("<|im_start|>assistant\n<think>\n")
    assert not opens_in_prompt("<think>\n\n</think>\n\n") and not opens_in_prompt("assistant\n")


def test_reasoning_content_over_http(tiny_model_dir):
    """A reply forced (by a regex) to think first: reasoning_content apart from content, the
    streamed deltas adding up to the whole response."""
    import httpx

    from server.app import create_app
    from server.config import ServerConfig
    from tests.server.conftest import tiny_engine_config
    from tests.server.helpers import ThreadedServer

    config = ServerConfig(engine=tiny_engine_config(tiny_model_dir), reasoning_parser="think")
    server = ThreadedServer(create_app(config)).start()
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "temperature": 1.0,
            "seed": 3, "guided_regex": "<think>[a-z]{3,8}</think>\n[a-z]{2,6}"}
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
            with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in r.iter_lines()
                          if line.startswith("data: {")]
            plain = client.post("/v1/chat/completions", json={**body, "guided_regex": "[a-z]{2,6}"}).json()
    finally:
        server.stop()
    assert 3 <= len(whole["reasoning_content"]) <= 8 and whole["reasoning_content"].isalpha()
    assert 2 <= len(whole["content"]) <= 6 and whole["content"].isalpha()
    assert "".join(d.get("reasoning_content", "") for d in deltas) == whole["reasoning_content"]
    assert "".join(d.get("content", "") for d in deltas) == whole["content"]
    assert "reasoning_content" not in plain["choices"][0]["message"]  # no think block, no field
