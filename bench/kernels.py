"""Weight kernels and whole steps, dense bf16 vs int4 (GGUF Q4_1), on this machine.

Part 1 times each projection shape of the default model (and its LM head) at 1..32 rows:
oneDNN-prepacked bf16 (`engine.model.Linear`) against `_weight_int4pack_mm_for_cpu` from the
file's own Q4_1 blocks; it is what `engine.quant.INT4_MAX_ROWS` is chosen from. Part 2 times
the engine's verify-shaped step (the SPS profile's shape: requests of 1 + 3 tokens over 128
tokens of context, logits for every token) with `--quantization none` and `int4`.

    dspark bench kernels [--rows 1 2 4 8 16 32] [--repeats 200]
"""

import argparse
import statistics
import time

import torch

from bench.common import save_result
from engine import LLM
from engine.model import Linear
from engine.quant import INT4_MAX_ROWS
from engine.sps_profiler import time_verify_step


def _time(fn, repeats: int) -> float:
    for _ in range(max(3, repeats // 10)):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernel_table(llm: LLM, rows: list[int], repeats: int) -> list[dict]:
    layer = llm.engine.model.layers[0]
    shapes = {"qkv_proj": layer.self_attn.qkv_proj, "o_proj": layer.self_attn.o_proj,
              "gate_up_proj": layer.mlp.gate_up_proj, "down_proj": layer.mlp.down_proj}
    out = []
    with torch.inference_mode():
        for name, lin in shapes.items():
            assert isinstance(lin, Linear) and lin.int4 is not None
            for m in rows:
                x = torch.randn(m, lin.in_features, dtype=torch.bfloat16)
                int4 = lin.int4
                t4 = _time(lambda int4=int4, x=x: int4(x), repeats)
                lin.int4 = None
                try:
                    tb = _time(lambda lin=lin, x=x: lin(x), repeats)
                finally:
                    lin.int4 = int4
                out.append({"weight": name, "shape": [lin.out_features, lin.in_features], "rows": m,
                            "bf16_us": tb * 1e6, "int4_us": t4 * 1e6, "int4_speedup": tb / t4})
    return out


def step_table(sizes: list[int], repeats: int) -> dict[str, dict[int, float]]:
    out = {}
    for q in ("none", "int4"):
        llm = LLM(dtype="bfloat16", quantization=q)
        eng = llm.engine
        out[q] = {b: time_verify_step(eng.runner, eng.block_manager, b, repeats) * 1e3 for b in sizes}
        del llm
    return out


def plot(kernels: list[dict], steps: dict[str, dict[int, float]], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(k["weight"] for k in kernels):
        pts = [k for k in kernels if k["weight"] == name]
        a.plot([k["rows"] for k in pts], [k["int4_speedup"] for k in pts], marker="o", label=name)
    a.axhline(1.0, color="gray", lw=0.8)
    a.axvline(INT4_MAX_ROWS, color="gray", ls="--", lw=0.8, label=f"INT4_MAX_ROWS={INT4_MAX_ROWS}")
    a.set_xscale("log", base=2)
    a.set_xlabel("token rows")
    a.set_ylabel("int4 speed-up over bf16 (x)")
    a.legend(fontsize=7)
    for q, pts in steps.items():
        b.plot(list(pts), list(pts.values()), marker="o", label=f"quantization {q}")
    b.set_xscale("log", base=2)
    b.set_xlabel("tokens per step (B)")
    b.set_ylabel("step ms (median)")
    b.legend()
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dspark bench kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 16, 32])
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--step-repeats", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    kernels = kernel_table(LLM(dtype="bfloat16", quantization="int4"), args.rows, args.repeats)
    for k in kernels:
        print(f"{k['weight']:>13} rows {k['rows']:>3}: bf16 {k['bf16_us']:8.1f} us  int4 {k['int4_us']:8.1f} us"
              f"  ({k['int4_speedup']:.2f}x)")
    steps = step_table(args.steps, args.step_repeats)
    print(f"{'B':>4} {'none ms':>9} {'int4 ms':>9}")
    for b in args.steps:
        print(f"{b:>4} {steps['none'][b]:>9.2f} {steps['int4'][b]:>9.2f}")
    path = save_result("kernels", {"int4_max_rows": INT4_MAX_ROWS, "kernels": kernels,
                                   "step_ms": {q: {str(b): t for b, t in s.items()} for q, s in steps.items()}},
                       args.out)
    png = path.with_suffix(".png")
    plot(kernels, steps, png)
    print(f"saved {path} and {png}")
    return 0
