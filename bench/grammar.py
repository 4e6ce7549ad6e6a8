"""Grammar engines for structured outputs, measured where the sampler would call them.

    dspark bench grammar [--batch-sizes 1,8,32] [--num-draft-tokens 7] [--rounds 5]

For xgrammar and llguidance, on the default model's vocabulary: grammar compile time (JSON
schema, and any JSON), then per decoding step the time to fill the token bitmasks of a batch of
matchers that walk a valid response (each library's batched / parallel call) plus advancing
them by one token; and the masks of every verify row of a speculative step (γ drafts
per request, the grammar state advanced along them). Medians over the response's tokens and
`--rounds` (p90 and max too: some grammar states cost far more); a plot of mask time per step against the batch size.
Last, whole engine steps of the default model at each batch size with every request constrained
by the schema vs unconstrained: the overhead structured outputs add to a decoding step.
"""

import argparse
import json
import time
from typing import Any

import torch

from bench.common import median, save_result, with_ext

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "address", "active"],
    "additionalProperties": False,
}
RESPONSE = json.dumps({"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry", "engines"],
                       "address": {"city": "London", "zip": "W1"}, "active": True})


def _allowed(mask: torch.Tensor, row: int, token: int) -> bool:
    return bool((int(mask[row, token // 32]) >> (token % 32)) & 1)


def _summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"median": 1e3 * median(times), "p90": 1e3 * ordered[int(0.9 * (len(ordered) - 1))],
            "max": 1e3 * ordered[-1]}


def _hf_tokenizer(tokenizer: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)


def bench_xgrammar(tokenizer, vocab_size: int, tokens: list[int], batch_sizes: list[int], rounds: int,
                   gamma: int) -> dict:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(_hf_tokenizer(tokenizer), vocab_size=vocab_size,
                                              stop_token_ids=sorted(tokenizer.eos_token_ids))
    compiler = xgr.GrammarCompiler(info, cache_enabled=False, max_threads=torch.get_num_threads())
    t0 = time.perf_counter()
    grammar = compiler.compile_json_schema(json.dumps(SCHEMA))
    compile_schema = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiler.compile_builtin_json_grammar()
    compile_any = time.perf_counter() - t0
    batch = xgr.BatchGrammarMatcher()
    out: dict[str, Any] = {"compile_schema_ms": 1e3 * compile_schema, "compile_json_ms": 1e3 * compile_any,
                           "step_ms": {}, "verify_step_ms": {}}
    for b in batch_sizes:
        mask = xgr.allocate_token_bitmask(b, vocab_size)
        spec_mask = xgr.allocate_token_bitmask(b * (gamma + 1), vocab_size)
        times, spec_times = [], []
        for _ in range(rounds):
            matchers = [xgr.GrammarMatcher(grammar, max_rollback_tokens=gamma) for _ in range(b)]
            for i, t in enumerate(tokens):
                drafts = tokens[i:i + gamma]  # rows along a fully accepted draft, then roll back
                if i + gamma < len(tokens):  # drafts end before the stop token
                    t0 = time.perf_counter()
                    for r, m in enumerate(matchers):
                        for k, d in enumerate(drafts):
                            m.fill_next_token_bitmask(spec_mask, r * (gamma + 1) + k)
                            m.accept_token(d)
                        m.fill_next_token_bitmask(spec_mask, r * (gamma + 1) + gamma)
                        m.rollback(gamma)
                    spec_times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                batch.batch_fill_next_token_bitmask(matchers, mask)
                batch.batch_accept_token(matchers, [t] * b)
                times.append(time.perf_counter() - t0)
                assert _allowed(mask, b - 1, t), "the mask refuses the valid response"
        out["step_ms"][b] = _summary(times)
        out["verify_step_ms"][b] = _summary(spec_times)
    return out


def bench_llguidance(tokenizer, vocab_size: int, tokens: list[int], batch_sizes: list[int], rounds: int,
                     gamma: int) -> dict:
    import llguidance
    import llguidance.torch as llt

    from engine.grammar import GrammarCompiler

    lltok = GrammarCompiler(tokenizer, vocab_size).tokenizer  # as the engine builds it
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    llguidance.LLMatcher(lltok, grammar)  # llguidance compiles lazily, per matcher
    compile_schema = time.perf_counter() - t0
    t0 = time.perf_counter()
    any_json = llguidance.LLMatcher.grammar_from_json_schema("{}")
    llguidance.LLMatcher(lltok, any_json)
    compile_any = time.perf_counter() - t0
    executor = llguidance.LLExecutor()
    out: dict[str, Any] = {"compile_schema_ms": 1e3 * compile_schema, "compile_json_ms": 1e3 * compile_any,
                           "step_ms": {}, "verify_step_ms": {}}
    for b in batch_sizes:
        mask = llt.allocate_token_bitmask(b, vocab_size)
        spec_mask = llt.allocate_token_bitmask(b * (gamma + 1), vocab_size)
        times, spec_times = [], []
        for _ in range(rounds):
            matchers = [llguidance.LLMatcher(lltok, grammar) for _ in range(b)]
            for i, t in enumerate(tokens):
                t0 = time.perf_counter()
                llt.fill_next_token_bitmask_par(executor, [(m, r) for r, m in enumerate(matchers)], mask)
                for m in matchers:
                    m.consume_token(t)
                times.append(time.perf_counter() - t0)
                assert _allowed(mask, b - 1, t), "the mask refuses the valid response"
                drafts = tokens[i + 1:i + 1 + gamma]  # the state after token i, as above
                if i + 1 + gamma < len(tokens):
                    t0 = time.perf_counter()
                    llt.fill_next_token_bitmask_par_with_draft_tokens(
                        executor, [(m, r * (gamma + 1), drafts) for r, m in enumerate(matchers)], spec_mask)
                    spec_times.append(time.perf_counter() - t0)
        out["step_ms"][b] = _summary(times)
        out["verify_step_ms"][b] = _summary(spec_times)
    return out


def plot(result: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in result["engines"].items():
        sizes = sorted(int(b) for b in r["step_ms"])
        ax.plot(sizes, [r["step_ms"][b]["median"] for b in sizes], marker="o", label=f"{name}: mask + advance")
        if "verify_step_ms" in r:
            ax.plot(sizes, [r["verify_step_ms"][b]["median"] for b in sizes], marker="s", linestyle="--",
                    label=f"{name}: {result['num_draft_tokens'] + 1} verify rows per request")
    ax.set_xlabel("requests in the batch")
    ax.set_ylabel("ms per step (median)")
    ax.set_xscale("log", base=2)
    ax.set_title(f"grammar masks, vocabulary {result['vocab_size']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def bench_engine_steps(sizes: list[int], rounds: int, max_tokens: int = 24) -> dict:
    """Whole engine steps (default model, plain decoding) with every request constrained by the
    schema vs the same requests unconstrained: median wall time of the steps in which all `c`
    requests decode, and the overhead the grammar adds to a step."""
    from engine import LLM, SamplingParams
    from scheduler import StructuredOutput

    llm = LLM(device="cpu")
    eng = llm.engine
    prompt = llm.encode_chat([{"role": "user", "content": "Describe a person as JSON."}])
    structured = StructuredOutput("json_schema", json.dumps(SCHEMA))
    out: dict = {}
    for c in sizes:
        medians = {}
        for name, constraint in (("unconstrained", None), ("json_schema", structured)):
            times = []
            for _ in range(rounds):
                for _ in range(c):
                    eng.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=1.0,
                                                           ignore_eos=constraint is None, structured=constraint))
                while eng.has_unfinished():
                    t0 = time.perf_counter()
                    eng.step()
                    dt = time.perf_counter() - t0
                    stats = eng.last_step
                    if stats is not None and stats.num_running == c and stats.num_scheduled_tokens == c:
                        times.append(dt)
            medians[name] = 1e3 * median(times)
        out[str(c)] = {**{f"{k}_step_ms": v for k, v in medians.items()},
                       "overhead_ms": medians["json_schema"] - medians["unconstrained"],
                       "overhead_ratio": medians["json_schema"] / medians["unconstrained"]}
    eng.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dspark bench grammar")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--num-draft-tokens", type=int, default=7)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import gguf

    from engine.loader import default_model_path
    from engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(gguf.GGUFReader(default_model_path()))
    vocab_size = tokenizer.vocab_size
    tokens = tokenizer.encode(RESPONSE, False) + [min(tokenizer.eos_token_ids)]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    result = {"vocab_size": vocab_size, "response_tokens": len(tokens), "num_draft_tokens": args.num_draft_tokens,
              "threads": torch.get_num_threads(), "engines": {
                  "xgrammar": bench_xgrammar(tokenizer, vocab_size, tokens, sizes, args.rounds,
                                             args.num_draft_tokens),
                  "llguidance": bench_llguidance(tokenizer, vocab_size, tokens, sizes, args.rounds,
                                                 args.num_draft_tokens)},
              "engine_steps": bench_engine_steps(sizes, args.rounds)}
    path = save_result("grammar", result, args.out)
    plot(result, with_ext(path, ".png"))
    print(json.dumps(result["engines"], indent=1))
    print(json.dumps(result["engine_steps"], indent=1))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
