"""Running the server for tests: in a thread of this process, or as a `dspark serve` process."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from server.launch import bind_socket

REPO = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"listening on (http://[\d.]+:\d+)")


def wait_healthy(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not become healthy in {timeout} s")
        time.sleep(0.1)


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


class ServerProcess:
    """`python -m server.cli serve --port 0 ...`; its log goes to a file (a pipe nobody reads
    would fill up and block the server)."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", "0",
             *args], cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})})
        self.url = self._wait_url(timeout=60)

    def _wait_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := _LISTENING.search(self.log()):
                return m.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"server did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 300) -> "ServerProcess":
        try:
            wait_healthy(self.url, timeout)
        except TimeoutError:
            raise TimeoutError(f"server not healthy:\n{self.log()}") from None
        return self

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


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
