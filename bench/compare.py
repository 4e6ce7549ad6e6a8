"""`dspark bench compare`: one serving sweep per engine configuration, in one run.

Each configuration launches its own `dspark serve` (same model, dtype, threads) and runs the
same concurrency sweep as `dspark bench serve`. Writes one JSON and two PNGs: per-user tok/s
against aggregate tok/s (the DSpark paper's Fig. 7) and the average verify budget per request
against concurrency (Fig. 8).

    dspark bench compare --config plain= --config "ngram=--draft ngram --num-draft-tokens 4" \\
        --concurrency 1,2,4,8,16,32
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

from bench.common import RESULTS, save_result, with_ext
from bench.serve import LevelResult, sweep
from bench.serve import parse_args as parse_serve_args
from server.process import ServerProcess

DEFAULT_CONFIGS = [
    "plain=--draft none",
    "mtp-1=--draft mtp --num-draft-tokens 1 --verify-policy fixed",
    "dspark-fixed=--draft dspark --num-draft-tokens 7 --verify-policy fixed",
    "dspark-scheduled=--draft dspark --num-draft-tokens 7 --verify-policy scheduled",
]


def run_config(name: str, server_args: str, sweep_argv: list[str]) -> list[LevelResult]:
    args = parse_serve_args(sweep_argv)
    launch = ["--max-num-seqs", str(max(args.concurrency)), *shlex.split(server_args)]
    log = Path(tempfile.mkdtemp(prefix=f"dspark-{name}-")) / "server.log"
    print(f"[{name}] dspark serve {shlex.join(launch)} (log: {log})", file=sys.stderr)
    server = ServerProcess(launch, log).wait_healthy()
    try:
        _, levels = asyncio.run(sweep(server.url, args))
    finally:
        server.terminate()
    return levels


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
    ap.add_argument("--out", type=Path, default=None)
    args, sweep_argv = ap.parse_known_args(argv)
    configs = [c.split("=", 1) for c in (args.config or DEFAULT_CONFIGS)]
    results: dict[str, list[LevelResult]] = {}
    for name, flags in configs:
        results[name] = run_config(name, f"{flags} {args.server_args}", sweep_argv)
    out, pngs = save_sweeps("compare", results, args.out, benchmark="serve_compare", configs=dict(configs))
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
