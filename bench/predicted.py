"""Predicted Outputs on code-edit requests: the original code as `prediction`, at concurrency 1.

    dspark bench predicted [--num-prompts 16] [--drafts none,dspark] [--max-new-tokens 256]

Each request asks for a small edit of a HumanEval function (repeat it with the function
renamed), the way an editor asks a model to rewrite a file. Every request is run back to
back three ways on the same engine: without a prediction, with the original code as prediction
(the small-edit case) and with another problem's code (a wrong prediction), greedy, so drift
hits all three. Reports per request and medians: per-user tok/s (after the first token, as the
server's dspark:request_output_tokens_per_second; end-to-end tok/s with the prefill too), tokens per
target forward, the prediction's accepted
and rejected draft tokens, whether the output equals the one without a prediction, and the
ratios to the run without a prediction; for each `--drafts` engine (`none`: plain decoding
plus the prediction; `dspark`: the default server's drafter and scheduled verification,
combined with the prediction). A bar plot of the speedups.

The model does not always make the small edit it is asked for (SmolLM2-135M often rewrites the
function), so each request's edit size is measured: the share of its output tokens that are not
in the longest matching blocks with the prediction (difflib on token ids). Medians are reported
over all requests and over the small edits (edit size <= SMALL_EDIT), the case the issue's 2x is for.
"""

import argparse
import difflib
import re
from typing import Any

from tqdm import tqdm

from bench.common import SHARED_PROMPTS, load_turns, median, save_result, with_ext
from bench.spec import run_one as spec_run_one
from engine import LLM, SamplingParams

CASES = ("none", "prediction", "wrong")
SUMMARY_KEYS = ("tok_s", "e2e_tok_s", "tokens_per_forward", "speedup", "e2e_speedup",
                "accepted_prediction_tokens", "rejected_prediction_tokens")
# an output that keeps at least 80% of its tokens from the prediction is a small edit of it
SMALL_EDIT = 0.2


def edit_size(prediction: list[int], output: list[int]) -> float:
    """Share of the output's tokens outside its matching blocks with the prediction."""
    blocks = difflib.SequenceMatcher(None, prediction, output, autojunk=False).get_matching_blocks()
    return 1.0 - sum(b.size for b in blocks) / max(1, len(output))


def code_edits(n: int) -> list[tuple[str, str]]:
    """(edit request, original code) for the first n HumanEval problems."""
    out = []
    for turn in load_turns(SHARED_PROMPTS / "eval" / "code_humaneval.jsonl", n):
        code = turn.split("```python\n", 1)[1].split("```", 1)[0].strip() + "\n"
        name = re.search(r"^def (\w+)", code, re.MULTILINE)
        assert name is not None, code
        # (SmolLM2-135M rewrites code it is asked to edit unless told to repeat it)
        request = (f"Repeat the following Python code exactly, but rename the function `{name.group(1)}` to "
                   f"`{name.group(1)}_v2`:\n```python\n{code}```")
        out.append((request, code))
    return out


def run_one(llm: LLM, prompt: list[int], params: SamplingParams) -> dict[str, Any]:
    """`bench spec`'s single-request run; per-user tok/s is the decode speed (after the first
    token, as dspark:request_output_tokens_per_second: the prefill is the TTFT, the same with
    or without a prediction), end-to-end tok/s includes the prefill."""
    r = spec_run_one(llm, prompt, params)
    return {**{k: v for k, v in r.items() if k not in ("tok_s", "decode_tok_s", "acceptance")},
            "tok_s": r["decode_tok_s"], "e2e_tok_s": r["tok_s"]}


def bench_engine(llm: LLM, edits: list[tuple[str, str]], max_new_tokens: int, bar: tqdm) -> dict[str, Any]:
    tok = llm.tokenizer
    rows = []
    for i, (request, code) in enumerate(edits):
        prompt = llm.encode_chat([{"role": "user", "content": request}])
        wrong = edits[(i + 1) % len(edits)][1]
        runs = {}
        for case, prediction in zip(CASES, (None, code, wrong)):
            params = SamplingParams(max_tokens=max_new_tokens, temperature=0,
                                    prediction=None if prediction is None else tok.encode(prediction))
            runs[case] = run_one(llm, prompt, params)
            bar.update(1)
        base = runs["none"]
        row: dict[str, Any] = {case: {k: v for k, v in r.items() if k != "token_ids"} | {
            "same_output": r["token_ids"] == base["token_ids"],
            "speedup": r["tok_s"] / base["tok_s"], "e2e_speedup": r["e2e_tok_s"] / base["e2e_tok_s"]}
            for case, r in runs.items()}
        row["edit_size"] = edit_size(tok.encode(code), base["token_ids"])
        rows.append(row)
    small = [r for r in rows if r["edit_size"] <= SMALL_EDIT]
    return {"summary": summarize(rows), "small_edit_summary": summarize(small),
            "num_small_edits": len(small), "rows": rows}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {}
    return {case: {key: median([r[case][key] for r in rows]) for key in SUMMARY_KEYS} | {
        "same_output_fraction": sum(r[case]["same_output"] for r in rows) / len(rows)} for case in CASES}


def plot(result: dict[str, Any], path) -> None:
    """Left: median speedups over all requests and over the small edits; right: each request's
    speedup with the correct prediction against its edit size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = result["engines"]
    groups = [(f"{e}\n{label}", r[key][case]["speedup"]) for e, r in engines.items()
              for label, key in (("all", "summary"), ("small edits", "small_edit_summary")) if r[key]
              for case in ("prediction", "wrong")]
    fig, (bars, scatter) = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = {"prediction": "tab:green", "wrong": "tab:red"}
    for i, (label, value) in enumerate(groups):
        bars.bar(i // 2 + (i % 2) * 0.4, value, 0.4, color=colors[("prediction", "wrong")[i % 2]])
    bars.set_xticks([k + 0.2 for k in range(len(groups) // 2)], [label for label, _ in groups[::2]], fontsize=8)
    bars.axhline(1.0, color="grey", lw=0.8)
    bars.set_ylabel("per-user tok/s vs no prediction (median)")
    bars.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()], labels=list(colors),
                title="prediction", fontsize=8)
    for e, r in engines.items():
        scatter.scatter([row["edit_size"] for row in r["rows"]], [row["prediction"]["speedup"] for row in r["rows"]],
                        label=f"--draft {e}")
    scatter.axvline(SMALL_EDIT, color="grey", ls="--", lw=0.8)
    scatter.axhline(1.0, color="grey", lw=0.8)
    scatter.set_xlabel("edit size (share of output tokens not from the prediction)")
    scatter.set_ylabel("speedup with the prediction")
    scatter.legend(fontsize=8)
    fig.suptitle("Predicted Outputs on code edits, concurrency 1")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dspark bench predicted")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--drafts", default="none,dspark", help="comma-separated engines (--draft values)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--dtype", default=None, help="default: the engine's default for the device")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    edits = code_edits(args.num_prompts)
    drafts = args.drafts.split(",")
    engines: dict[str, Any] = {}
    bar = tqdm(total=len(drafts) * len(edits) * len(CASES), desc="bench predicted")
    for draft in drafts:
        llm = LLM(dtype=args.dtype, device="cpu", draft=None if draft == "none" else draft)
        run_one(llm, llm.encode_chat([{"role": "user", "content": "Hi"}]), SamplingParams(max_tokens=4))
        engines[draft] = bench_engine(llm, edits, args.max_new_tokens, bar)
        engines[draft]["dtype"] = llm.engine.config.dtype
        llm.engine.close()
    bar.close()
    result = {"benchmark": "predicted_outputs_code_edit", "max_new_tokens": args.max_new_tokens,
              "num_prompts": len(edits), "engines": engines}
    path = save_result("predicted", result, args.out)
    plot(result, with_ext(path.with_suffix(""), ".png"))
    print(f"saved {path}")
    for draft, r in engines.items():
        for label, key in (("all", "summary"), (f"{r['num_small_edits']} small edits", "small_edit_summary")):
            for case, s in r[key].items():
                print(f"--draft {draft:>6} {label:>14} prediction={case:<10}: {s['tok_s']:.1f} tok/s "
                      f"({s['speedup']:.2f}x; end-to-end {s['e2e_speedup']:.2f}x), "
                      f"{s['tokens_per_forward']:.2f} tokens/forward, accepted {s['accepted_prediction_tokens']:.0f} "
                      f"rejected {s['rejected_prediction_tokens']:.0f}, identical {s['same_output_fraction']:.0%}")
    return 0


if __name__ == "__main__":
    main()
