"""Start `dspark serve` as a child process and find its URL (for benchmarks and tests).

Kept free of engine imports so a client-side tool can use it without loading torch.
"""

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

import httpx

LISTENING = "dspark-serve listening on http://%s:%d"  # logged by server.launch at startup
_LISTENING_RE = re.compile(r"dspark-serve listening on (http://\S+):(\d+)")
_REPO = Path(__file__).resolve().parents[1]


def wait_healthy(url: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Poll `url`/health until it answers 200 (it answers 503 while the model loads); stop
    early with ChildProcessError once `alive()` says the server is gone."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if not alive():
            raise ChildProcessError(f"{url}: the server exited before it became healthy")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not become healthy in {timeout} s")
        time.sleep(0.1)


class ServerProcess:
    """`python -m server.cli serve --port 0 ARGS`, logging to a file: a pipe that nobody reads
    would fill up and block the server."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None,
                 host: str = "127.0.0.1") -> None:
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - the child writes it until kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--host", host, "--port", "0", *args],
            cwd=_REPO, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})})
        self.url = self._wait_url(timeout=60)

    def _wait_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := _LISTENING_RE.search(self.log()):
                return f"{m.group(1)}:{m.group(2)}"
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"the server did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 300) -> Self:
        try:
            wait_healthy(self.url, timeout, alive=lambda: self.proc.poll() is None)
        except (TimeoutError, ChildProcessError) as e:
            self.kill()
            raise type(e)(f"the server did not become healthy:\n{self.log()}") from None
        return self

    def terminate(self, timeout: float = 60) -> int | None:
        """SIGTERM (drain), then wait; kills it if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()
