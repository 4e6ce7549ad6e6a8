"""Replicas behind sglang-router (the router deploy/ ships): three real CPU replicas of the default
model (one thread each) and the router on loopback, streams through the router, then one replica
is stopped mid-run, first gracefully (SIGTERM: it drains) and then by a crash (SIGKILL).

Expected: a draining replica finishes the streams it holds and new requests go to the others; a
crashed replica's streams end with an error at the client (the router cannot resume a stream it
already relayed), never hang, and every new request succeeds on the survivors."""

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.process import ServerProcess
from tests.deploy.helpers import free_port

pytest.importorskip("sglang_router")
pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
STREAM_TIMEOUT = 120.0  # far above a 48-token stream here; a hang fails the test


class Router:
    def __init__(self, workers: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "wb")  # noqa: SIM115 - the child writes it until close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
             "--port", str(self.port), "--worker-urls", *workers, "--policy", "cache_aware",
             "--health-check-endpoint", "/health", "--health-check-interval-secs", "1",
             "--health-failure-threshold", "1", "--retry-max-retries", "3", "--log-level", "warn",
             "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, log_path.read_text(errors="replace")
            time.sleep(0.2)
        raise TimeoutError(log_path.read_text(errors="replace"))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("router")
    replicas = [ServerProcess(["--device", "cpu", "--num-threads", "1", "--max-num-seqs", "16",
                               "--drain-timeout", "60"], logs / f"replica{i}.log") for i in range(3)]
    router = None
    try:
        for r in replicas:
            r.wait_healthy()
        router = Router([r.url for r in replicas], logs / "router.log")
        yield router, replicas
    finally:
        if router is not None:
            router.close()
        for r in replicas:
            r.kill()


async def stream(client: httpx.AsyncClient, url: str, i: int) -> dict:
    """One streamed chat through the router: finished (saw [DONE]), chunks, or the error."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"Write a story about a robot, take {i}."}],
            "max_tokens": 48, "stream": True}
    out = {"done": False, "chunks": 0, "error": None, "status": None}
    try:
        async with asyncio.timeout(STREAM_TIMEOUT):
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                out["status"] = r.status_code
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        out["done"] = True
                    elif "error" in (event := json.loads(line[6:])):
                        out["error"] = event["error"]
                    else:
                        out["chunks"] += 1
    except TimeoutError:
        out["error"] = "hung"
    except httpx.HTTPError as e:
        out["error"] = type(e).__name__
    return out


def running(replica: ServerProcess) -> float:
    text = httpx.get(f"{replica.url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("dspark:num_requests_running{"))


async def streams_then_stop(router: Router, live: list[ServerProcess], sig: signal.Signals
                            ) -> tuple[list[dict], ServerProcess, list[dict], float]:
    """8 streams; once they run, `sig` to the replica holding most of them; then 8 new
    requests. Returns the streams, the stopped replica, the new requests and the seconds from
    the signal to the first new request that succeeded."""
    async with httpx.AsyncClient(timeout=STREAM_TIMEOUT) as client:
        tasks = [asyncio.create_task(stream(client, router.url, i)) for i in range(8)]
        deadline = time.monotonic() + 60
        while sum(running(r) for r in live) < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        victim = max(live, key=running)
        assert running(victim) > 0
        victim.proc.send_signal(sig)
        stopped_at = time.monotonic()
        first_ok: list[float] = []

        async def later(i: int) -> dict:
            r = await stream(client, router.url, 100 + i)
            if r["done"] and not first_ok:
                first_ok.append(time.monotonic() - stopped_at)
            return r

        new = await asyncio.gather(*[later(i) for i in range(8)])
        return await asyncio.gather(*tasks), victim, new, first_ok[0] if first_ok else float("nan")


def report(label: str, old: list[dict], new: list[dict], recovery: float) -> None:
    ok = sum(r["done"] and r["error"] is None for r in old)
    print(f"{label}: in-flight streams {ok} ok / {len(old) - ok} failed "
          f"({sorted({str(r['error']) for r in old if r['error']})}); new requests "
          f"{sum(r['done'] for r in new)} / {len(new)} ok; first new success {recovery:.2f} s after the signal")


def test_drain_then_crash_behind_the_router(cluster):
    router, replicas = cluster
    live = list(replicas)

    # SIGTERM: the replica drains, so every stream it holds finishes; new requests go elsewhere
    old, victim, new, recovery = asyncio.run(streams_then_stop(router, live, signal.SIGTERM))
    report("SIGTERM", old, new, recovery)
    assert all(r["done"] and r["error"] is None and r["chunks"] > 0 for r in old), old
    assert all(r["done"] and r["error"] is None for r in new), new
    # a clean exit after the drain (uvicorn re-raises the SIGTERM it handled once it is done)
    assert victim.proc.wait(timeout=90) in (0, -signal.SIGTERM)
    assert "engine stopped" in victim.log()
    live.remove(victim)

    # SIGKILL: its streams end with an error (none hangs), new requests all succeed
    old, victim, new, recovery = asyncio.run(streams_then_stop(router, live, signal.SIGKILL))
    report("SIGKILL", old, new, recovery)
    assert not any(r["error"] == "hung" for r in old)
    assert any(r["error"] is not None for r in old)  # the crashed replica held some of them
    assert all(r["done"] or r["error"] is not None for r in old)  # each one ended, one way or the other
    assert all(r["done"] and r["error"] is None for r in new), new
    live.remove(victim)
    assert [r.proc.poll() for r in live] == [None]
