"""Running the server in a thread of the test process, and reading SSE bodies and metrics."""

import json
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from engine import LLMEngine
from server.launch import bind_socket
from server.process import ServerProcess, wait_healthy

REPO = Path(__file__).resolve().parents[2]

__all__ = [
    "REPO",
    "ServerProcess",
    "SlowEngine",
    "ThreadedServer",
    "metric",
    "metric_samples",
    "parse_sse",
    "wait_healthy",
]


class SlowEngine(LLMEngine):
    """Steps take at least 20 ms, so a request stays running long enough to observe a queue."""

    def step(self):
        time.sleep(0.02)
        return super().step()


class ThreadedServer:
    """uvicorn on an ephemeral loopback port, in a thread (the app stays inspectable)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        sock = bind_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)

    def start(self, wait: bool = True, timeout: float = 60) -> "ThreadedServer":
        self.thread.start()
        if wait:
            wait_healthy(self.url, timeout)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def parse_sse(lines: list[str]) -> tuple[list[dict], bool]:
    """The JSON events of an SSE body and whether it ended with [DONE]."""
    events, done = [], False
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: "):]
        assert not done, "event after [DONE]"
        if payload == "[DONE]":
            done = True
        else:
            events.append(json.loads(payload))
    return events, done


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a /metrics body, parsed by prometheus_client."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items()
               if n == name and set(labels.items()) <= set(ls))
