"""Decode benchmark: our engine vs Hugging Face transformers `generate`, side by side.

Same model file (the embedded SmolLM2 GGUF), same prompts (chat-templated MT-Bench first
turns), same thread count, greedy, a fixed number of new tokens (EOS ignored). For each
concurrency c: HF runs one static batch of c prompts (left-padded); we submit c requests at
once to the continuous-batching engine. Per-user tok/s = new tokens / that request's latency
(prompt included); aggregate tok/s = all new tokens / wall time.

    dspark bench engine [--concurrency 1 8 32] [--max-new-tokens 64] [--variants float32 bfloat16 bfloat16+int4]

A variant is our dtype, plus `+int4` for the GGUF file's Q4_1 weights on small steps
(`--quantization int4`); a bare dtype runs dense (`--quantization none`).
"""

import argparse
import logging
import time
from typing import Any

import torch
from tqdm import tqdm

from bench.common import SHARED_PROMPTS, load_turns, median, save_result
from engine import LLM, SamplingParams
from engine.loader import default_model_path

logger = logging.getLogger(__name__)


def run_ours(llm: LLM, prompts: list[list[int]], max_new: int) -> dict[str, float]:
    eng = llm.engine
    params = SamplingParams(max_tokens=max_new, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    start = time.monotonic()
    for p in prompts:
        eng.add_request(p, params, arrival_time=start)
    latencies, n_tokens = [], 0
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                latencies.append(time.monotonic() - out.arrival_time)
                n_tokens += len(out.token_ids)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "aggregate_tok_s": n_tokens / wall,
            "per_user_tok_s": median([max_new / lat for lat in latencies])}


def run_hf(model, prompts: list[list[int]], max_new: int, pad_id: int) -> dict[str, float]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                             do_sample=False, pad_token_id=pad_id)
    wall = time.perf_counter() - t0
    n_tokens = (out.shape[1] - width) * len(prompts)
    return {"wall_s": wall, "aggregate_tok_s": n_tokens / wall, "per_user_tok_s": max_new / wall}


def load_hf(dtype: torch.dtype):
    import transformers

    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              torch_dtype=dtype)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dspark bench engine", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--variants", nargs="+", default=["float32", "bfloat16", "bfloat16+int4"],
                    help="our engine's dtype[+int4]; HF always runs fp32 (its fastest CPU path)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per point; the median is kept")
    ap.add_argument("--prompts", default=str(SHARED_PROMPTS / "eval" / "chat_mt_bench.jsonl"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    llms = {}
    for variant in args.variants:
        dtype, _, quant = variant.partition("+")
        llms[variant.replace("+", "_")] = LLM(dtype=dtype, device="cpu", num_threads=threads,
                                              quantization=quant or "none",
                                              max_num_seqs=max(args.concurrency))
    any_llm = next(iter(llms.values()))
    texts = load_turns(args.prompts, max(args.concurrency))
    prompts = [any_llm.encode_chat([{"role": "user", "content": t}]) for t in texts]
    hf = load_hf(torch.float32)
    pad = any_llm.tokenizer.eos_token_ids and min(any_llm.tokenizer.eos_token_ids) or 0

    # warm-up: first calls pay for allocator growth and kernel selection
    run_hf(hf, prompts[:2], 4, pad)
    for llm in llms.values():
        run_ours(llm, prompts[:2], 4)

    rows = []
    total = len(args.concurrency) * args.repeats * (1 + len(llms))
    bar = tqdm(total=total, desc="bench engine")
    for c in args.concurrency:
        batch = prompts[:c]
        runs: dict[str, list[dict[str, float]]] = {"hf_float32": []}
        for _ in range(args.repeats):  # interleave candidate and baseline against drift
            runs["hf_float32"].append(run_hf(hf, batch, args.max_new_tokens, pad))
            bar.update(1)
            for dt, llm in llms.items():
                runs.setdefault(f"ours_{dt}", []).append(run_ours(llm, batch, args.max_new_tokens))
                bar.update(1)
        row: dict[str, Any] = {"concurrency": c}
        for name, rs in runs.items():
            row[name] = {k: median([r[k] for r in rs]) for k in rs[0]}
        base = row["hf_float32"]
        for dt in llms:
            ours = row[f"ours_{dt}"]
            row[f"ratio_{dt}_vs_hf"] = {
                "per_user": ours["per_user_tok_s"] / base["per_user_tok_s"],
                "aggregate": ours["aggregate_tok_s"] / base["aggregate_tok_s"]}
        rows.append(row)
        logger.info("c=%d %s", c, row)
    bar.close()
    result = {"benchmark": "engine_decode", "model": "SmolLM2-135M-Instruct Q4_1 (dequantised; +int4: its Q4_1 blocks on small steps)",
              "max_new_tokens": args.max_new_tokens, "threads": threads, "repeats": args.repeats,
              "rows": rows}
    path = save_result("engine", result, args.out)
    print(f"saved {path}")
    for row in rows:
        parts = [f"c={row['concurrency']:>3}", (f"HF fp32 per-user {row['hf_float32']['per_user_tok_s']:.1f} "
                 f"agg {row['hf_float32']['aggregate_tok_s']:.1f}")]
        for dt in llms:
            o, r = row[f"ours_{dt}"], row[f"ratio_{dt}_vs_hf"]
            parts.append(f"ours {dt} per-user {o['per_user_tok_s']:.1f} ({r['per_user']:.2f}x) "
                         f"agg {o['aggregate_tok_s']:.1f} ({r['aggregate']:.2f}x)")
        print(" | ".join(parts))
    return 0


if __name__ == "__main__":
    main()
