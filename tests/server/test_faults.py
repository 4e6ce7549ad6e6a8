"""Injected faults seen from HTTP: each fails the affected requests with a clear error, the others
go on, or (engine dead) every request fails, /health says so and the server exits for its
supervisor; nothing hangs and nothing leaks.

| fault                         | affected requests                 | the rest        | /health |
| ----------------------------- | --------------------------------- | --------------- | ------- |
| NaN logits for one request    | 500 request_failed / in-band      | served          | 200     |
| the drafter raises            | none: plain decoding, exact       | served          | 200     |
| an engine step raises         | 503 / in-band error, all          | process exits   | 503     |
| the engine thread dies        | same as a step that raises        | process exits   | 503     |
| a client stops reading        | aborted after --send-timeout      | served          | 200     |
| a body trickles in            | 408 after the body timeout        | served          | 200     |
| past --request-timeout        | 504 / in-band timeout error       | served          | 200     |
"""

import asyncio
import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from engine import LLMEngine
from engine.async_engine import AsyncLLM
from server.app import create_app
from server.config import ServerConfig
from tests.engine.test_faults import FailingDrafter
from tests.server.conftest import tiny_engine_config
from tests.server.helpers import SlowEngine, ThreadedServer, metric, metric_samples, parse_sse

CHAT = "/v1/chat/completions"


def body(max_tokens: int = 16, **fields) -> dict:
    return {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, **fields}


def stream_events(url: str, payload: dict) -> tuple[list[dict], bool]:
    with httpx.stream("POST", f"{url}{CHAT}", json={**payload, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        return parse_sse(list(r.iter_lines()))


def content_of(events: list[dict]) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))


class FaultyEngine(SlowEngine):
    """A slow engine whose behaviour tests switch at run time through class attributes."""

    nan_next = False  # the next sampled logits come back NaN (every row)
    raise_next = False  # the next step raises
    exit_next = False  # the engine thread exits after the next step (raise_in_listener)

    def __init__(self, config, drafter=None):
        super().__init__(config, drafter)
        original = self.model.compute_logits

        def compute_logits(hidden):
            logits = original(hidden)
            if FaultyEngine.nan_next:
                FaultyEngine.nan_next = False
                logits = torch_full_nan(logits)
            return logits

        self.model.compute_logits = compute_logits

    def step(self):
        if FaultyEngine.raise_next:
            FaultyEngine.raise_next = False
            raise RuntimeError("injected step failure")
        return super().step()


def torch_full_nan(logits):
    return logits.clone().fill_(float("nan"))


def start(tiny_model_dir, factory=FaultyEngine, **server_options) -> tuple[ThreadedServer, list[str]]:
    fatal: list[str] = []
    config = ServerConfig(engine=tiny_engine_config(tiny_model_dir, max_num_seqs=8), **server_options)
    engine = AsyncLLM(config.engine, engine_factory=factory)
    server = ThreadedServer(create_app(config, engine, on_fatal=lambda: fatal.append("exit"))).start()
    return server, fatal


@pytest.fixture
def faulty(tiny_model_dir) -> Iterator[tuple[ThreadedServer, list[str]]]:
    FaultyEngine.nan_next = FaultyEngine.raise_next = FaultyEngine.exit_next = False
    server, fatal = start(tiny_model_dir, send_timeout=1.0, body_timeout=1.0)
    yield server, fatal
    server.stop()


def test_nan_logits_fail_the_request_not_the_server(faulty):
    server, fatal = faulty
    FaultyEngine.nan_next = True
    r = httpx.post(f"{server.url}{CHAT}", json=body(), timeout=60)
    assert r.status_code == 500, r.text
    assert r.json()["error"]["code"] == "request_failed"
    assert "NaN" in r.json()["error"]["message"]
    # streamed: the role chunk may be out, then an in-band error; no token from the NaN step
    first = httpx.post(f"{server.url}{CHAT}", json=body(4), timeout=60).json()
    FaultyEngine.nan_next = True
    with httpx.stream("POST", f"{server.url}{CHAT}", json={**body(), "stream": True}, timeout=60) as s:
        status = s.status_code
        text = s.read().decode()
    if status == 200:  # the NaN hit after the first token: in-band error
        events, done = parse_sse(text.splitlines())
        assert done and "error" in events[-1]
    else:  # the NaN hit the first step: a plain 500
        assert status == 500
    assert httpx.get(f"{server.url}/health").status_code == 200
    again = httpx.post(f"{server.url}{CHAT}", json=body(4), timeout=60).json()
    assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    assert not fatal and server.app.state.server.engine.num_in_flight == 0
    samples = metric_samples(httpx.get(f"{server.url}/metrics").text)
    assert metric(samples, "dspark:request_success_total", finish_reason="error") >= 1


def raise_in_listener(stats) -> None:
    if FaultyEngine.exit_next:
        FaultyEngine.exit_next = False
        raise SystemExit("injected: the engine thread exits")


@pytest.mark.parametrize("where", ["step", "thread"])
def test_a_failing_step_fails_every_request_and_exits(faulty, where):
    """`step`: LLMEngine.step raises; `thread`: the engine thread itself is torn down (a
    SystemExit from its step listener, outside any step)."""
    server, fatal = faulty
    if where == "thread":
        server.app.state.server.engine.add_step_listener(raise_in_listener)

    async def run() -> list:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            started = [asyncio.Event() for _ in range(3)]

            async def streamed(first_line: asyncio.Event):
                async with client.stream("POST", CHAT, json={**body(200), "stream": True}) as r:
                    lines = []
                    async for line in r.aiter_lines():
                        lines.append(line)
                        first_line.set()
                    return r.status_code, lines

            tasks = [asyncio.create_task(streamed(e)) for e in started]
            tasks += [asyncio.create_task(client.post(CHAT, json=body(200))) for _ in range(3)]
            # every stream under way (a fixed sleep raced a slow machine: a stream the failure
            # beat to its first event is answered with a plain 503, rightly)
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
            setattr(FaultyEngine, "raise_next" if where == "step" else "exit_next", True)
            return await asyncio.wait_for(asyncio.gather(*tasks), 30)  # nothing hangs

    results = asyncio.run(run())
    for status, lines in results[:3]:
        events, done = parse_sse(lines)
        assert status == 200 and done and "step loop died" in events[-1]["error"]["message"]
    for r in results[3:]:
        assert r.status_code == 503 and "step loop died" in r.json()["error"]["message"]
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
    assert httpx.post(f"{server.url}{CHAT}", json=body()).status_code == 503
    assert fatal == ["exit"]  # launch.serve then exits with status 1 for the supervisor
    assert server.app.state.server.engine_failed


def test_a_drafter_that_raises_leaves_outputs_unchanged(tiny_model_dir):
    plain, _ = start(tiny_model_dir, factory=LLMEngine)
    failing, fatal = start(tiny_model_dir, factory=lambda c: LLMEngine(c, FailingDrafter(4, fail_at=2)))
    try:
        payload = body(24, messages=[{"role": "user", "content": "la la la la la la la la"}])
        for _ in range(2):
            expected = httpx.post(f"{plain.url}{CHAT}", json=payload, timeout=60).json()
            got = httpx.post(f"{failing.url}{CHAT}", json=payload, timeout=60).json()
            assert got["choices"][0]["message"] == expected["choices"][0]["message"]
        assert httpx.get(f"{failing.url}/health").status_code == 200 and not fatal
    finally:
        plain.stop()
        failing.stop()


def test_a_client_that_stops_reading_is_dropped(faulty):
    server, _ = faulty
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills after a few events
    sock.connect((host, int(port)))
    payload = json.dumps({**body(400), "n": 8, "stream": True, "logprobs": True, "top_logprobs": 20}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    engine = server.app.state.server.engine
    deadline = time.monotonic() + 30
    while engine.num_in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.num_in_flight == 8  # it started, and then the client never reads
    while engine.num_in_flight and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.num_in_flight == 0, "the stalled stream still holds its requests"
    while engine.stats.num_running and time.monotonic() < deadline:  # the aborts land a loop later
        time.sleep(0.05)
    assert engine.stats.num_running == 0
    sock.close()
    assert httpx.post(f"{server.url}{CHAT}", json=body(4), timeout=60).status_code == 200


def test_a_body_that_trickles_in_gets_408(faulty):
    server, _ = faulty
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mess")
        sock.settimeout(10)
        reply = b""
        while chunk := sock.recv(65536):  # the server closes after the 408
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 408"), reply
    assert '"code":"request_timeout"' in reply.replace(" ", "")
    assert httpx.post(f"{server.url}{CHAT}", json=body(4), timeout=60).status_code == 200


def test_request_timeout_cuts_long_requests(tiny_model_dir):
    server, _ = start(tiny_model_dir, request_timeout=0.5)
    try:
        t0 = time.monotonic()
        r = httpx.post(f"{server.url}{CHAT}", json=body(400), timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
        assert time.monotonic() - t0 < 5
        events, done = stream_events(server.url, body(400))
        assert done and "--request-timeout" in events[-1]["error"]["message"]
        assert content_of(events)  # what came before the deadline was sent
        assert httpx.post(f"{server.url}{CHAT}", json=body(4), timeout=60).status_code == 200
        engine = server.app.state.server.engine
        assert engine.num_in_flight == 0
    finally:
        server.stop()
