"""`dspark bench soak`: mixed traffic against one server for a long while; memory, KV blocks and
speed over time.

Clients loop over a mix of full streams, streams dropped mid-way, short and long prompts, n = 2,
requests cut by a client timeout and bad inputs. Every few seconds the server's RSS and its
metrics are sampled. Afterwards it reports the requests by kind, the unexpected errors (a 5xx,
a broken connection, a stream that ended without [DONE], a bad input that was accepted), the RSS
at start and end with its slope, the KV blocks still referenced once idle (a leak), and tok/s
per window (steady or not). JSON and a PNG under bench/results/.

    dspark bench soak --minutes 30                 # launches `dspark serve` (default model)
    dspark bench soak --minutes 30 --url URL --pid PID
"""

import argparse
import asyncio
import itertools
import json
import random
import shlex
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from tqdm import tqdm

from bench.common import RESULTS, median, save_result, with_ext
from server.process import ServerProcess

CHAT = "/v1/chat/completions"
BAD_INPUTS: list[tuple[dict[str, Any] | bytes, int]] = [
    (b'{"messages": [', 400), ({"messages": []}, 400), ({"messages": [{"role": "user", "content": "x"}],
                                                         "max_tokens": -1}, 400),
    ({"messages": [{"role": "user", "content": "x"}], "model": "nope"}, 404),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400),
    ({"messages": [{"role": "user", "content": "x"}], "audio": {"voice": "a"}}, 400),
]
KINDS = {"stream": 30, "stream_dropped": 20, "short": 20, "long_prompt": 10, "bad_input": 10,
         "n2": 5, "client_timeout": 5}


@dataclass
class Sample:
    t: float
    rss_mb: float | None
    generation_tokens: float
    kv_referenced: float
    running: float


@dataclass
class SoakResult:
    seconds: float
    requests: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    kv_blocks_leaked: float = float("nan")
    healthy_after: bool = False

    def summary(self) -> dict[str, Any]:
        rss = [s.rss_mb for s in self.samples if s.rss_mb is not None]
        rates = window_rates(self.samples)
        third = max(1, len(rates) // 3)
        return {"requests": sum(self.requests.values()), "errors": self.errors,
                "rss_start_mb": rss[0] if rss else None, "rss_end_mb": rss[-1] if rss else None,
                "rss_slope_mb_per_hour": rss_slope(self.samples),
                "kv_blocks_leaked": self.kv_blocks_leaked, "healthy_after": self.healthy_after,
                "tok_s_first_third": median(rates[:third]), "tok_s_last_third": median(rates[-third:])}


def window_rates(samples: list[Sample]) -> list[float]:
    return [(b.generation_tokens - a.generation_tokens) / (b.t - a.t)
            for a, b in itertools.pairwise(samples) if b.t > a.t]


def rss_slope(samples: list[Sample]) -> float | None:
    """Least-squares RSS slope in MB per hour over the second half: during the first, the
    preallocated KV pool's pages are touched for the first time and allocator pools fill."""
    points = [(s.t, s.rss_mb) for s in samples if s.rss_mb is not None]
    points = points[len(points) // 2:]
    if len(points) < 3:
        return None
    mt = sum(t for t, _ in points) / len(points)
    mr = sum(r for _, r in points) / len(points)
    var = sum((t - mt) ** 2 for t, _ in points)
    return 3600 * sum((t - mt) * (r - mr) for t, r in points) / var if var else None


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels` (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name) and line[len(name):len(name) + 1] in "{ "
                and all(f'{k}="{v}"' in line for k, v in labels.items())):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Soak:
    def __init__(self, url: str, seconds: float, clients: int, api_key: str | None, pid: int | None,
                 long_prompt_words: int, max_tokens: int, seed: int = 0) -> None:
        self.url, self.seconds, self.clients = url, seconds, clients
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.process = psutil.Process(pid) if pid else None
        self.long_words, self.max_tokens = long_prompt_words, max_tokens
        self.rng = random.Random(seed)
        self.result = SoakResult(seconds)
        self.counts: Counter[str] = Counter()

    def body(self, kind: str) -> dict[str, Any]:
        words = self.long_words if kind == "long_prompt" else self.rng.randrange(2, 20)
        text = " ".join(self.rng.choice(["tell", "me", "about", "the", "sea", "code", "a", "cat", "why"])
                        for _ in range(words))
        return {"messages": [{"role": "user", "content": text}], "max_tokens": self.rng.randrange(1, self.max_tokens),
                "temperature": self.rng.choice([0.0, 0.7, 1.0]), "n": 2 if kind == "n2" else 1}

    def error(self, kind: str, what: str) -> None:
        self.result.errors += 1
        if len(self.result.error_examples) < 20:
            self.result.error_examples.append(f"{kind}: {what}")

    async def one(self, client: httpx.AsyncClient, kind: str) -> None:
        try:
            if kind in ("stream", "stream_dropped"):
                keep = self.rng.randrange(1, 6) if kind == "stream_dropped" else None
                async with client.stream("POST", CHAT, json={**self.body(kind), "stream": True}) as r:
                    if r.status_code != 200:
                        return self.error(kind, f"status {r.status_code}")
                    if keep is not None:
                        async for _ in r.aiter_bytes():
                            keep -= 1
                            if not keep:
                                break  # dropped: the server must abort and free it
                        return
                    text = "".join([chunk async for chunk in r.aiter_text()])
                    self.check_stream(kind, text)
            elif kind == "bad_input":
                payload, status = self.rng.choice(BAD_INPUTS)
                r = await (client.post(CHAT, content=payload) if isinstance(payload, bytes)
                           else client.post(CHAT, json=payload))
                if r.status_code != status or '"error"' not in r.text:
                    self.error(kind, f"status {r.status_code}, expected {status}")
            else:
                timeout = 0.05 if kind == "client_timeout" else 300
                try:
                    r = await client.post(CHAT, json=self.body(kind), timeout=timeout)
                except httpx.TimeoutException:
                    if kind != "client_timeout":
                        self.error(kind, "timed out")
                    return
                if r.status_code != 200:
                    self.error(kind, f"status {r.status_code}: {r.text[:200]}")
        except httpx.TransportError as e:
            self.error(kind, repr(e))
        finally:
            self.counts[kind] += 1

    def check_stream(self, kind: str, text: str) -> None:
        # events split as SSE defines lines (CR / LF only): httpx's aiter_lines also splits at
        # U+2028 and the like, which JSON strings may hold unescaped
        data = [event[6:] for event in text.split("\n\n") if event.startswith("data: ")]
        if not data or data[-1] != "[DONE]":
            return self.error(kind, "the stream ended without [DONE]")
        for payload in data[:-1]:
            try:
                event = json.loads(payload)
            except ValueError:
                return self.error(kind, f"an event that is not JSON: {payload[:200]!r}")
            if "error" in event:
                return self.error(kind, f"error event: {event['error']}")

    async def client_loop(self, until: float) -> None:
        kinds, weights = list(KINDS), list(KINDS.values())
        async with httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=300) as client:
            while time.monotonic() < until:
                await self.one(client, self.rng.choices(kinds, weights)[0])

    async def sample(self, client: httpx.AsyncClient, t0: float) -> Sample:
        text = (await client.get("/metrics")).text
        rss = self.process.memory_info().rss / 2**20 if self.process else None
        return Sample(time.monotonic() - t0, rss, metric_value(text, "dspark:generation_tokens_total"),
                      metric_value(text, "dspark:kv_cache_blocks", state="referenced"),
                      metric_value(text, "dspark:num_requests_running"))

    async def run(self, sample_every: float = 5.0) -> SoakResult:
        t0 = time.monotonic()
        until = t0 + self.seconds
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as monitor:
            loops = asyncio.gather(*(self.client_loop(until) for _ in range(self.clients)))
            with tqdm(total=round(self.seconds), desc="soak", unit="s") as bar:
                while time.monotonic() < until:
                    self.result.samples.append(await self.sample(monitor, t0))
                    await asyncio.sleep(min(sample_every, max(0.0, until - time.monotonic())))
                    bar.n = min(round(time.monotonic() - t0), bar.total)
                    bar.set_postfix(requests=sum(self.counts.values()), errors=self.result.errors)
            await loops
            self.result.kv_blocks_leaked = await self.idle_referenced_blocks(monitor)
            self.result.samples.append(await self.sample(monitor, t0))
            self.result.healthy_after = (await monitor.get("/health")).status_code == 200
        self.result.requests = dict(self.counts)
        return self.result

    async def idle_referenced_blocks(self, monitor: httpx.AsyncClient, timeout: float = 60) -> float:
        """KV blocks still referenced once nothing runs (aborts land a step later)."""
        deadline = time.monotonic() + timeout
        while True:
            text = (await monitor.get("/metrics")).text
            idle = (metric_value(text, "dspark:num_requests_running") == 0
                    and metric_value(text, "dspark:num_requests_waiting") == 0)
            referenced = metric_value(text, "dspark:kv_cache_blocks", state="referenced")
            if (idle and referenced == 0) or time.monotonic() > deadline:
                return referenced
            await asyncio.sleep(0.2)


def plot(result: SoakResult, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    samples = result.samples
    rss = [(s.t / 60, s.rss_mb) for s in samples if s.rss_mb is not None]
    if rss:
        top.plot(*zip(*rss), "-")
    top.set_ylabel("server RSS (MB)")
    rates = window_rates(samples)
    bottom.plot([s.t / 60 for s in samples[1:len(rates) + 1]], rates, "-", label="generated tok/s")
    bottom.plot([s.t / 60 for s in samples], [s.kv_referenced for s in samples], "-", label="KV blocks referenced")
    bottom.set_xlabel("minutes")
    bottom.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dspark bench soak", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--url", default=None, help="a running server (default: launch dspark serve)")
    p.add_argument("--pid", type=int, default=None, help="with --url: the server's pid, for its RSS")
    p.add_argument("--server-args", default="", help="extra `dspark serve` flags when launching")
    p.add_argument("--api-key", default=None)
    p.add_argument("--long-prompt-words", type=int, default=1500)
    p.add_argument("--max-tokens", type=int, default=64, help="outputs are 1 .. this many tokens")
    p.add_argument("--out", type=Path, default=None, help="output path without suffix")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or RESULTS / f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
    out.parent.mkdir(parents=True, exist_ok=True)
    server = None
    if args.url is None:
        launch = ["--max-num-seqs", str(args.clients * 2), *shlex.split(args.server_args)]
        log = Path(tempfile.mkdtemp(prefix="dspark-soak-")) / "server.log"
        print(f"launching dspark serve {shlex.join(launch)} (log: {log})", file=sys.stderr)
        server = ServerProcess(launch, log).wait_healthy()
    try:
        soak = Soak(server.url if server else args.url, args.minutes * 60, args.clients, args.api_key,
                    server.proc.pid if server else args.pid, args.long_prompt_words, args.max_tokens)
        result = asyncio.run(soak.run())
    finally:
        if server is not None:
            server.terminate()
    summary = result.summary()
    save_result("soak", {"benchmark": "soak", "config": vars(args) | {"out": str(out)},
                         "summary": summary, **asdict(result)}, str(with_ext(out, ".json")))
    plot(result, f"soak: {summary['requests']} requests, {summary['errors']} errors, "
                 f"{args.clients} clients", with_ext(out, ".png"))
    for key, value in summary.items():
        print(f"{key:>24}: {value}")
    print(f"requests by kind: {result.requests}")
    print(f"wrote {with_ext(out, '.json')} and {with_ext(out, '.png')}")
    return 1 if result.errors or result.kv_blocks_leaked else 0
