"""`dspark bench serve`: sweep client concurrency against a running OpenAI-compatible server.

At each concurrency level C, C closed-loop clients stream chat completions (prompts: the first
turns of MT-Bench, or of several prompt files interleaved) until `rounds * C` requests are done. Per request: time to first token (first
content chunk), inter-chunk latencies, and per-user decode speed (completion tokens - 1) /
(last chunk - first chunk), the same definition as the server's
`dspark:request_output_tokens_per_second`. Per level: aggregate output tok/s (all completion
tokens / wall time) and medians. Writes JSON (with the exact command line) and a PNG of per-user
tok/s against aggregate tok/s under bench/results/.

    dspark bench serve                               # start a server on a free port, sweep, stop it
    dspark bench serve --url http://127.0.0.1:8000   # against a running server
"""

import argparse
import asyncio
import json
import math
import os
import shlex
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path

import httpx
from tqdm import tqdm

from bench.common import RESULTS, SHARED_PROMPTS, load_turns, median, save_result, with_ext
from server import envs
from server.process import ServerProcess

DEFAULT_PROMPTS = SHARED_PROMPTS / "eval" / "chat_mt_bench.jsonl"


@dataclass(slots=True)
class RequestResult:
    ok: bool
    start_s: float  # since the start of its level
    e2e_s: float
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between content chunks
    prompt_tokens: int = 0
    completion_tokens: int = 0
    per_user_tok_s: float | None = None
    error: str | None = None

    @property
    def tok_s_incl_ttft(self) -> float:
        """completion tokens / end-to-end latency: bench engine's per-user definition."""
        return self.completion_tokens / self.e2e_s if self.e2e_s > 0 else 0.0


@dataclass(slots=True)
class LevelResult:
    concurrency: int
    num_requests: int
    num_failed: int
    duration_s: float
    aggregate_tok_s: float
    # Medians over successful requests; NaN when there are none.
    median_per_user_tok_s: float
    median_tok_s_incl_ttft: float
    median_ttft_s: float
    p90_ttft_s: float
    median_itl_s: float
    median_e2e_s: float
    requests: list[RequestResult]
    # From the server's /metrics over the level: draft tokens verified per request per decode
    # step, steps that verify nothing included (DSpark's verify budget, Fig. 8; 0 for plain
    # decoding or a resting drafter), and accepted per verified token (NaN: none verified).
    avg_verify_tokens_per_request: float = math.nan
    acceptance_rate: float = math.nan


async def chat_events(client: httpx.AsyncClient, body: dict) -> AsyncIterator[dict]:
    """The parsed SSE events of one streamed chat completion; RuntimeError for an HTTP error
    status or an in-band error event."""
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                raise RuntimeError(event["error"].get("message"))
            yield event


async def run_request(client: httpx.AsyncClient, body: dict, level_start: float) -> RequestResult:
    start = time.perf_counter()
    chunk_times: list[float] = []
    usage: dict | None = None
    try:
        async for event in chat_events(client, body):
            usage = event.get("usage") or usage
            if any(c["delta"].get("content") for c in event.get("choices", [])):
                chunk_times.append(time.perf_counter())
    except (httpx.HTTPError, RuntimeError, ValueError) as e:
        return RequestResult(False, start - level_start, time.perf_counter() - start, error=str(e))
    end = time.perf_counter()
    result = RequestResult(True, start - level_start, end - start)
    if usage is not None:
        result.prompt_tokens = usage["prompt_tokens"]
        result.completion_tokens = usage["completion_tokens"]
    if chunk_times:
        result.ttft_s = chunk_times[0] - start
        result.itl_s = [b - a for a, b in pairwise(chunk_times)]
        decode_s = chunk_times[-1] - chunk_times[0]
        if result.completion_tokens > 1 and decode_s > 0:
            result.per_user_tok_s = (result.completion_tokens - 1) / decode_s
    return result


async def run_level(url: str, headers: dict, bodies: list[dict], concurrency: int,
                    bar: tqdm) -> LevelResult:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    results: list[RequestResult] = []
    pending = iter(bodies)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(None, connect=30)) as client:
        level_start = time.perf_counter()

        async def worker() -> None:
            for body in pending:  # shared iterator: each body is taken by exactly one worker
                results.append(await run_request(client, body, level_start))
                bar.update(1)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - level_start
    return summarize(concurrency, results, duration)


def summarize(concurrency: int, results: list[RequestResult], duration: float) -> LevelResult:
    ok = [r for r in results if r.ok]
    ttfts = sorted(r.ttft_s for r in ok if r.ttft_s is not None)
    return LevelResult(
        concurrency=concurrency, num_requests=len(results), num_failed=len(results) - len(ok),
        duration_s=duration,
        aggregate_tok_s=sum(r.completion_tokens for r in ok) / duration if duration > 0 else 0.0,
        median_per_user_tok_s=median([r.per_user_tok_s for r in ok if r.per_user_tok_s]),
        median_tok_s_incl_ttft=median([r.tok_s_incl_ttft for r in ok]),
        median_ttft_s=median(ttfts),
        p90_ttft_s=ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))] if ttfts else math.nan,
        median_itl_s=median([x for r in ok for x in r.itl_s]),
        median_e2e_s=median([r.e2e_s for r in ok]),
        requests=results)


def plot(levels: list[LevelResult], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(lv.aggregate_tok_s, lv.median_per_user_tok_s, lv.concurrency) for lv in levels
           if not math.isnan(lv.median_per_user_tok_s)]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
    for x, y, c in pts:
        ax.annotate(f"c={c}", (x, y), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("aggregate output tokens/s")
    ax.set_ylabel("median per-user output tokens/s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")  # a half-written PNG never has the final name
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def build_bodies(prompts: list[str], n: int, model: str, args: argparse.Namespace) -> list[dict]:
    return [{"model": model, "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
             "max_tokens": args.max_tokens, "temperature": args.temperature,
             "ignore_eos": args.ignore_eos, "stream": True,
             "stream_options": {"include_usage": True}} for i in range(n)]


def interleave(sets: list[list[str]]) -> list[str]:
    """Round-robin over prompt sets (a, b, c, a, b, c, ...) until every set is used up."""
    return [xs[i] for i in range(max(map(len, sets), default=0)) for xs in sets if i < len(xs)]


async def served_model(url: str, headers: dict, wanted: str | None) -> str:
    """`wanted`, or the server's first model."""
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        r = await client.get("/v1/models")
        r.raise_for_status()
        return wanted or r.json()["data"][0]["id"]


def level_bodies(model: str, args: argparse.Namespace) -> list[tuple[int, list[dict]]]:
    """(concurrency, requests) per level: rounds x concurrency requests each, and different
    prompts per level (an offset), so no level replays another's prompts."""
    prompts = interleave([load_turns(f) for f in args.prompts])
    if not prompts:
        raise ValueError(f"no prompts in {args.prompts}")
    levels, offset = [], 0
    for c in args.concurrency:
        n = max(1, args.rounds * c)
        levels.append((c, build_bodies(prompts[offset % len(prompts):] + prompts, n, model, args)))
        offset += n
    return levels


async def measured_level(url: str, headers: dict, bodies: list[dict], concurrency: int,
                         bar: tqdm) -> tuple[LevelResult, dict[str, float] | None]:
    """One level, with its speculation figures and the raw counter deltas behind them (None
    for a server without our /metrics)."""
    before = await spec_counters(url)
    level = await run_level(url, headers, bodies, concurrency, bar)
    after = await spec_counters(url)
    delta = None if before is None or after is None else {k: after[k] - before[k] for k in after}
    if delta is not None:
        add_spec_figures(level, delta)
    return level, delta


async def warm_up(url: str, headers: dict, body: dict) -> None:
    """One request, unmeasured (first-call costs: kernels, allocator, connection)."""
    await run_level(url, headers, [body], 1, tqdm(disable=True))


def auth_headers(args: argparse.Namespace) -> dict:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


async def sweep(url: str, args: argparse.Namespace) -> tuple[str, list[LevelResult]]:
    headers = auth_headers(args)
    model = await served_model(url, headers, args.model)
    plan = level_bodies(model, args)
    if args.warmup:
        await warm_up(url, headers, plan[0][1][0])
    bar = tqdm(total=sum(len(b) for _, b in plan), desc="bench serve", unit="req")
    levels = []
    for c, bodies in plan:
        bar.set_postfix(concurrency=c)
        levels.append((await measured_level(url, headers, bodies, c, bar))[0])
    bar.close()
    return model, levels


def add_spec_figures(level: LevelResult, delta: dict[str, float]) -> None:
    # every decode step of a request commits one token plus its accepted drafts; the first
    # token comes from the prefill
    decode_steps = sum(r.completion_tokens - 1 for r in level.requests if r.ok and r.completion_tokens)
    decode_steps -= delta["accepted"]
    if decode_steps > 0:
        level.avg_verify_tokens_per_request = delta["verified"] / decode_steps
    if delta["verified"]:
        level.acceptance_rate = delta["accepted"] / delta["verified"]


_SPEC_SERIES = {"verified": "dspark:spec_decode_num_verify_tokens_total",
                "accepted": "dspark:spec_decode_num_accepted_tokens_total"}


async def spec_counters(url: str) -> dict[str, float] | None:
    """Totals of the speculation series on the server's /metrics (all models summed); None for
    a server without them (no /metrics, or not ours: llama.cpp answers 501 without --metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            r = await client.get("/metrics")
        if r.status_code != 200:
            return None
        families = list(text_string_to_metric_families(r.text))
    except (httpx.HTTPError, ValueError):
        return None
    totals = dict.fromkeys(_SPEC_SERIES, 0.0)
    names = {v: k for k, v in _SPEC_SERIES.items()}
    found = False
    for family in families:
        for sample in family.samples:
            if sample.name in names:
                totals[names[sample.name]] += sample.value
                found = True
    return totals if found else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dspark bench serve", description=__doc__.splitlines()[0])
    target = p.add_mutually_exclusive_group()
    target.add_argument("--url", default=None, help="a running server (default: --launch)")
    target.add_argument("--launch", action="store_true",
                        help="start `dspark serve` on a free loopback port for the sweep "
                             "(the default without --url)")
    p.add_argument("--server-args", default="",
                   help="extra `dspark serve` flags with --launch, e.g. '--dtype float32'")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 2, 4, 8, 16, 32], help="comma-separated levels (default 1..32)")
    p.add_argument("--rounds", type=int, default=2, help="requests per level = rounds x level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly max-tokens per request (default on)")
    p.add_argument("--prompts", type=Path, nargs="+", default=[DEFAULT_PROMPTS],
                   help="JSONL files with {'turns': [...]} per line, interleaved so every level "
                        "mixes them (default: MT-Bench)")
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--api-key", default=envs.get("DSPARK_API_KEY"))
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", type=Path, default=None,
                   help="output path without suffix (default bench/results/serve-<time>)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.launch = args.launch or args.url is None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or RESULTS / f"serve-{stamp}"
    out.parent.mkdir(parents=True, exist_ok=True)
    server = None
    if args.launch:
        launch_args = ["--max-num-seqs", str(max(args.concurrency)), *shlex.split(args.server_args)]
        log = Path(tempfile.mkdtemp(prefix="dspark-bench-")) / "server.log"
        print(f"launching dspark serve {shlex.join(launch_args)} (log: {log})", file=sys.stderr)
        server = ServerProcess(launch_args, log).wait_healthy()
    try:
        url = server.url if server else args.url
        model, levels = asyncio.run(sweep(url, args))
    finally:
        if server is not None:
            server.terminate()
    report = {
        "benchmark": "serve",
        "argv": argv if argv is not None else sys.argv[1:],
        "url": url,
        "model": model,
        "launched": args.launch,
        "server_args": args.server_args,
        "config": json.loads(json.dumps(vars(args), default=str)),  # paths as strings
        "per_user_tok_s": "(completion tokens - 1) / (last content chunk - first content chunk)",
        "levels": [asdict(lv) for lv in levels],
    }
    save_result("serve", report, str(with_ext(out, ".json")))  # adds command line, machine
    plot(levels, f"{model} ({'launched' if args.launch else url}), max_tokens {args.max_tokens}",
         with_ext(out, ".png"))
    print(f"{'conc':>4} {'reqs':>4} {'fail':>4} {'agg tok/s':>9} {'user tok/s':>10} "
          f"{'TTFT s':>7} {'ITL ms':>7} {'e2e s':>6}")
    for lv in levels:
        print(f"{lv.concurrency:>4} {lv.num_requests:>4} {lv.num_failed:>4} "
              f"{lv.aggregate_tok_s:>9.1f} {_fmt(lv.median_per_user_tok_s, 1):>10} "
              f"{_fmt(lv.median_ttft_s, 2):>7} {_fmt(lv.median_itl_s, 1, 1000):>7} "
              f"{_fmt(lv.median_e2e_s, 1):>6}")
    print(f"wrote {with_ext(out, '.json')} and {with_ext(out, '.png')}")
    return 1 if any(lv.num_failed for lv in levels) else 0


def _fmt(value: float, digits: int, scale: float = 1.0) -> str:
    return "-" if math.isnan(value) else f"{value * scale:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
