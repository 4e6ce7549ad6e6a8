"""`dspark bench compare`: one serving sweep per engine configuration, in one run.

Each configuration launches its own `dspark serve` (same model, dtype, threads) and runs the
same concurrency sweep as `dspark bench serve`. Writes one JSON and two PNGs: per-user tok/s
against aggregate tok/s (the DSpark paper's Fig. 7) and the average verify budget per request
against concurrency (Fig. 8).

    dspark bench compare --config plain= --config "ngram=--draft ngram --num-draft-tokens 4" \\
        --concurrency 1,2,4,8,16,32

By default one configuration runs its whole sweep after the other, so a machine that drifts
(a noisy VM: ±15% between minutes here) moves the ratios. `--interleave` starts every
server first (an idle one costs nothing) and runs each level as `rounds` passes of one round
of requests each, the configurations taking turns in A B B A order with the same requests,
so slow drift cancels out of the ratios.
"""

import argparse
import asyncio
import math
import shlex
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from bench.common import RESULTS, save_result, with_ext
from bench.serve import (
    LevelResult,
    add_spec_figures,
    auth_headers,
    level_bodies,
    measured_level,
    served_model,
    summarize,
    sweep,
    warm_up,
)
from bench.serve import parse_args as parse_serve_args
from server.process import ServerProcess

DEFAULT_CONFIGS = [
    "plain=--draft none",
    "mtp-1=--draft mtp --num-draft-tokens 1 --verify-policy fixed",
    "dspark-fixed=--draft dspark --num-draft-tokens 7 --verify-policy fixed",
    "dspark-scheduled=--draft dspark --num-draft-tokens 7 --verify-policy scheduled",
]


def launch(name: str, server_args: str, args: argparse.Namespace) -> ServerProcess:
    flags = ["--max-num-seqs", str(max(args.concurrency)), *shlex.split(server_args)]
    log = Path(tempfile.mkdtemp(prefix=f"dspark-{name}-")) / "server.log"
    print(f"[{name}] dspark serve {shlex.join(flags)} (log: {log})", file=sys.stderr)
    return ServerProcess(flags, log).wait_healthy()


def run_config(name: str, server_args: str, sweep_argv: list[str]) -> list[LevelResult]:
    args = parse_serve_args(sweep_argv)
    server = launch(name, server_args, args)
    try:
        _, levels = asyncio.run(sweep(server.url, args))
    finally:
        server.terminate()
    return levels


def run_interleaved(configs: list[tuple[str, str]], sweep_argv: list[str]) -> dict[str, list[LevelResult]]:
    args = parse_serve_args(sweep_argv)
    servers: dict[str, ServerProcess] = {}
    try:
        for name, flags in configs:
            servers[name] = launch(name, flags, args)
        return asyncio.run(interleaved_sweeps({n: s.url for n, s in servers.items()}, args))
    finally:
        for server in servers.values():
            server.terminate()


async def interleaved_sweeps(urls: dict[str, str], args: argparse.Namespace) -> dict[str, list[LevelResult]]:
    """Every level as `args.rounds` passes of one round (concurrency requests at once); in
    pass p the configurations run the same requests, in order if p is even, else reversed.
    A configuration's level merges its passes: their requests, summed durations and counters."""
    headers = auth_headers(args)
    model = await served_model(next(iter(urls.values())), headers, args.model)
    plan = level_bodies(model, args)
    if args.warmup:
        for url in urls.values():
            await warm_up(url, headers, plan[0][1][0])
    names = list(urls)
    bar = tqdm(total=len(names) * sum(len(b) for _, b in plan), desc="bench compare", unit="req")
    results: dict[str, list[LevelResult]] = {n: [] for n in names}
    for c, bodies in plan:
        runs: dict[str, list[tuple[LevelResult, dict[str, float] | None]]] = {n: [] for n in names}
        for p, start in enumerate(range(0, len(bodies), c)):
            for name in names if p % 2 == 0 else names[::-1]:
                bar.set_postfix(concurrency=c, config=name)
                runs[name].append(await measured_level(urls[name], headers, bodies[start:start + c], c, bar))
        for name, parts in runs.items():
            results[name].append(merge_passes(c, parts))
    bar.close()
    return results


def merge_passes(concurrency: int, parts: list[tuple[LevelResult, dict[str, float] | None]]) -> LevelResult:
    """One level from its passes: all their requests over their summed time, and the
    speculation figures of their summed counters (when every pass had them)."""
    level = summarize(concurrency, [r for lv, _ in parts for r in lv.requests],
                      sum(lv.duration_s for lv, _ in parts))
    deltas = [d for _, d in parts]
    if deltas and all(d is not None for d in deltas):
        add_spec_figures(level, {k: sum(d[k] for d in deltas) for k in deltas[0]})
    return level


def plot(results: dict[str, list[LevelResult]], path_prefix: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for name, levels in results.items():
        ax.plot([lv.aggregate_tok_s for lv in levels], [lv.median_per_user_tok_s for lv in levels],
                "o-", label=name)
    ax.set_xlabel("aggregate output tokens/s")
    ax.set_ylabel("median per-user output tokens/s")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(path_prefix.with_name(path_prefix.name + "-per-user-vs-throughput.png"))
    fig.savefig(paths[-1], dpi=120)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for name, levels in results.items():
        pts = [(lv.concurrency, lv.avg_verify_tokens_per_request) for lv in levels
               if not math.isnan(lv.avg_verify_tokens_per_request)]
        if pts:
            ax.plot(*zip(*pts), "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency")
    ax.set_ylabel("average draft tokens verified per request per step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(path_prefix.with_name(path_prefix.name + "-verify-budget.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close("all")
    return paths


def save_sweeps(name: str, results: dict[str, list[LevelResult]], out: Path | None, **report) -> tuple[Path, list[Path]]:
    """One JSON (levels without their per-request rows) and the plots for several sweeps."""
    out = out or RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.parent.mkdir(parents=True, exist_ok=True)
    report["results"] = {n: [{k: v for k, v in asdict(lv).items() if k != "requests"} for lv in levels]
                         for n, levels in results.items()}
    save_result(name, report, str(with_ext(out, ".json")))
    return out, plot(results, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dspark bench compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=None,
                    help="NAME=DSPARK_SERVE_FLAGS, repeatable (default: plain, mtp-1, "
                         "dspark-fixed, dspark-scheduled)")
    ap.add_argument("--server-args", default="", help="flags added to every configuration")
    ap.add_argument("--interleave", action="store_true",
                    help="all servers up at once, the configurations taking turns per round "
                         "(drift cancels out of the ratios; module docstring)")
    ap.add_argument("--out", type=Path, default=None)
    args, sweep_argv = ap.parse_known_args(argv)
    configs = [(name, f"{flags} {args.server_args}".strip())
               for name, flags in (c.split("=", 1) for c in (args.config or DEFAULT_CONFIGS))]
    if args.interleave:
        results = run_interleaved(configs, sweep_argv)
    else:
        results = {name: run_config(name, flags, sweep_argv) for name, flags in configs}
    out, pngs = save_sweeps("compare", results, args.out, benchmark="serve_compare",
                            configs=dict(configs), interleaved=args.interleave)
    print(f"{'config':>18} {'conc':>4} {'agg tok/s':>9} {'user tok/s':>10} {'verify/req':>10} {'accept':>6}")
    for name, levels in results.items():
        for lv in levels:
            print(f"{name:>18} {lv.concurrency:>4} {lv.aggregate_tok_s:>9.1f} "
                  f"{lv.median_per_user_tok_s:>10.1f} {lv.avg_verify_tokens_per_request:>10.2f} "
                  f"{lv.acceptance_rate:>6.2f}")
    print(f"wrote {with_ext(out, '.json')}, {pngs[0].name}, {pngs[1].name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
