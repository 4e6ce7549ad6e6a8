"""`dspark bench prefix`: multi-turn chats against `dspark serve` with the prefix cache on and
off, in one run.

    dspark bench prefix [--concurrency 1,16] [--workloads mtbench,chat8] [--max-tokens 32]

Workloads: `mtbench`, MT-Bench's two turns per conversation; `chat8`, a synthetic 8-turn chat
under a ~1k-token system prompt shared by every conversation (user turns from MT-Bench's and
HumanEval's first turns). Each conversation sends its whole history every turn, the model's own
replies included, as chat products do. At concurrency c, c conversations run side by side;
each configuration is its own server (same flags but `--no-prefix-caching`). Reports per
workload and c: TTFT of first and later turns, aggregate output tok/s, the prompt tokens
served from the cache, and the drafter's acceptance (accepted per verified draft token) on
later turns; ratios cache-on / cache-off. Greedy (temperature 0), so the runs see the same
conversations. A bar plot of the ratios.
"""

import argparse
import asyncio
import json
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from bench.common import SHARED_PROMPTS, load_turns, median, save_result, with_ext
from bench.serve import chat_events
from server.process import ServerProcess

CONFIGS = {"cache": [], "no-cache": ["--no-prefix-caching"]}


@dataclass
class Turn:
    conversation: int
    index: int
    ttft_s: float
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int
    draft_tokens: int
    accepted_tokens: int
    text: str = field(repr=False, default="")


def system_prompt(num_words: int = 700) -> str:
    """~1k tokens of instructions, the same for every conversation (as a product's is)."""
    rules = [f"Rule {i}: answer politely, stay on topic, be concise and cite no sources you cannot name."
             for i in range(1, num_words // 14 + 1)]
    return "You are the assistant of a travel and programming help desk. " + " ".join(rules)


def conversations(workload: str, n: int) -> tuple[str | None, list[list[str]]]:
    """(shared system prompt or None, user turns per conversation)."""
    path = SHARED_PROMPTS / "eval" / "chat_mt_bench.jsonl"
    with open(path) as f:
        rows = [json.loads(line)["turns"] for line in f if line.strip()]
    if workload == "mtbench":
        return None, [rows[i % len(rows)][:2] for i in range(n)]
    assert workload == "chat8", workload
    pool = [t for r in rows for t in r] + load_turns(SHARED_PROMPTS / "eval" / "code_humaneval.jsonl", 40)
    return system_prompt(), [[pool[(7 * c + 11 * k) % len(pool)] for k in range(8)] for c in range(n)]


async def converse(client: httpx.AsyncClient, conv: int, system: str | None, users: list[str],
                   max_tokens: int, bar: tqdm) -> list[Turn]:
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    turns = []
    for k, user in enumerate(users):
        messages.append({"role": "user", "content": user})
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        start, ttft, text, usage = time.perf_counter(), None, [], {}
        async for event in chat_events(client, body):
            for c in event.get("choices", []):
                if c["delta"].get("content"):
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    text.append(c["delta"]["content"])
            usage = event.get("usage") or usage
        reply = "".join(text)
        spec = usage.get("speculative_decoding") or {}
        turns.append(Turn(conv, k, ttft if ttft is not None else time.perf_counter() - start,
                          usage["completion_tokens"], usage["prompt_tokens"],
                          usage["prompt_tokens_details"]["cached_tokens"], spec.get("draft_tokens", 0),
                          spec.get("accepted_tokens", 0), reply))
        messages.append({"role": "assistant", "content": reply})
        bar.update(1)
    return turns


def summarize(turns: list[Turn], duration: float) -> dict[str, Any]:
    turns = sorted(turns, key=lambda t: (t.conversation, t.index))
    later = [t for t in turns if t.index > 0]
    drafted = sum(t.draft_tokens for t in later)
    return {
        "num_turns": len(turns), "duration_s": duration,
        "aggregate_tok_s": sum(t.completion_tokens for t in turns) / duration,
        "median_ttft_first_turn_s": median([t.ttft_s for t in turns if t.index == 0]),
        "median_ttft_later_turns_s": median([t.ttft_s for t in later]),
        "median_ttft_second_turn_s": median([t.ttft_s for t in turns if t.index == 1]),
        "cached_prompt_fraction": sum(t.cached_tokens for t in turns) / max(1, sum(t.prompt_tokens for t in turns)),
        "later_turns_acceptance": sum(t.accepted_tokens for t in later) / drafted if drafted else float("nan"),
        "later_turns_draft_tokens": drafted,
        "turns": [asdict(t) for t in turns],
    }


async def run_level(url: str, workload: str, concurrency: int, num_conversations: int, max_tokens: int,
                    bar: tqdm) -> dict[str, Any]:
    system, users = conversations(workload, num_conversations)
    pending = iter(enumerate(users))
    turns: list[Turn] = []
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(None, connect=30)) as client:
        start = time.perf_counter()

        async def worker() -> None:
            for conv, us in pending:
                turns.extend(await converse(client, conv, system, us, max_tokens, bar))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - start
    return summarize(turns, duration)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(result["ratios"])
    names = ["TTFT (2nd turn) speedup", "aggregate tok/s ratio"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for j, (name, metric) in enumerate(zip(names, ["ttft_second_turn_speedup", "aggregate_tok_s_ratio"])):
        ax.bar([i + j * width for i in range(len(keys))], [result["ratios"][k][metric] for k in keys], width,
               label=name)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([i + width / 2 for i in range(len(keys))], keys)
    ax.set_ylabel("cache on / cache off")
    ax.set_title("Prefix caching on multi-turn chats")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dspark bench prefix", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="1,16", help="comma-separated levels (default 1,16)")
    p.add_argument("--workloads", default="mtbench,chat8")
    p.add_argument("--conversations-at-1", type=int, default=4, help="conversations run at concurrency 1")
    p.add_argument("--max-tokens", type=int, default=32, help="reply length cap per turn")
    p.add_argument("--server-args", default="", help="extra `dspark serve` flags for both servers")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/prefix-<time>.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    workloads = args.workloads.split(",")
    runs: dict[str, dict[str, Any]] = {}
    for name, flags in CONFIGS.items():
        launch = ["--max-num-seqs", str(max(levels)), *shlex.split(args.server_args), *flags]
        log = Path(tempfile.mkdtemp(prefix=f"dspark-prefix-{name}-")) / "server.log"
        print(f"[{name}] dspark serve {shlex.join(launch)} (log: {log})", file=sys.stderr)
        server = ServerProcess(launch, log).wait_healthy()
        try:
            for workload in workloads:
                for c in levels:
                    n = args.conversations_at_1 if c == 1 else c
                    total = n * (2 if workload == "mtbench" else 8)
                    with tqdm(total=total, desc=f"{name} {workload} c={c}", unit="turn") as bar:
                        runs[f"{name}/{workload}/c={c}"] = asyncio.run(
                            run_level(server.url, workload, c, n, args.max_tokens, bar))
        finally:
            server.terminate()
    ratios = {}
    for workload in workloads:
        for c in levels:
            on, off = runs[f"cache/{workload}/c={c}"], runs[f"no-cache/{workload}/c={c}"]
            ratios[f"{workload} c={c}"] = {
                "ttft_second_turn_speedup": off["median_ttft_second_turn_s"] / on["median_ttft_second_turn_s"],
                "ttft_later_turns_speedup": off["median_ttft_later_turns_s"] / on["median_ttft_later_turns_s"],
                "aggregate_tok_s_ratio": on["aggregate_tok_s"] / off["aggregate_tok_s"],
                "later_turns_acceptance": [on["later_turns_acceptance"], off["later_turns_acceptance"]],
                "same_replies": [t["text"] for t in on["turns"]] == [t["text"] for t in off["turns"]],
            }
    result = {"runs": runs, "ratios": ratios, "levels": levels, "workloads": workloads}
    path = save_result("prefix", result, args.out)
    plot(result, with_ext(path.with_suffix(""), ".png"))
    for key, r in ratios.items():
        print(f"{key:16s} TTFT 2nd turn x{r['ttft_second_turn_speedup']:.2f}  later x{r['ttft_later_turns_speedup']:.2f}  "
              f"aggregate x{r['aggregate_tok_s_ratio']:.2f}  acceptance on/off "
              f"{r['later_turns_acceptance'][0]:.3f}/{r['later_turns_acceptance'][1]:.3f}  same replies {r['same_replies']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
