"""The real embedded default model against Hugging Face transformers, and batching on it."""

import pytest
import torch

from engine import LLM, SamplingParams
from engine.loader import default_model_path

pytestmark = pytest.mark.slow

CHATS = [
    "What is the capital of France? Answer in one sentence, then explain its history.",
    "Write a Python function that checks whether a number is prime.",
    "Explain photosynthesis to a ten-year-old.",
    "List five tips for staying productive when working from home.",
    "Translate 'good morning, how are you?' into French, Spanish and German.",
    "Solve step by step: 17 * 23 + 4.",
    "Write a haiku about autumn leaves.",
    "What are the differences between TCP and UDP?",
]


@pytest.fixture(scope="module")
def hf_model():
    import transformers

    path = default_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32).eval()


def test_prefill_logits_match_transformers(default_llm, hf_model):
    ids = default_llm.encode_chat([{"role": "user", "content": CHATS[0]}])
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0]
    ours = default_llm.engine.prompt_logits(ids)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-3


def test_greedy_matches_transformers(default_llm, hf_model):
    prompts = [default_llm.encode_chat([{"role": "user", "content": c}]) for c in CHATS]
    ours = default_llm.generate(prompts, SamplingParams(max_tokens=64, temperature=0))
    eos = default_llm.tokenizer.eos_token_ids
    compared = 0
    for prompt, out in zip(prompts, ours):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False,
                                    eos_token_id=sorted(eos), pad_token_id=min(eos))
        ref_ids = ref[0, len(prompt):].tolist()
        assert out.token_ids == ref_ids, default_llm.tokenizer.decode(ref_ids)
        compared += len(ref_ids)
    assert compared >= 8 * 40  # most replies run the full 64 tokens


def test_batching_is_invisible_on_default_model(default_llm):
    from tests.engine.test_engine import run_staggered

    prompts = [default_llm.encode_chat([{"role": "user", "content": c * (1 + i % 3)}])
               for i, c in enumerate(CHATS + CHATS)]
    params = [SamplingParams(max_tokens=12 + (i % 4) * 4, temperature=0, ignore_eos=True) for i in range(16)]
    expected = {i: default_llm.generate([p], sp)[0].token_ids for i, (p, sp) in enumerate(zip(prompts, params))}
    assert run_staggered(default_llm, prompts, params, per_step=3) == expected
    # a pool small enough to preempt, without and with the prefix cache (which shares the
    # repeated prompts, so it needs a smaller pool to run out)
    for caching, num_blocks in ((False, 80), (True, 48)):
        small = LLM(dtype="float32", device="cpu", num_blocks=num_blocks, block_size=4,
                    enable_prefix_caching=caching)
        assert run_staggered(small, prompts, params, per_step=4) == expected
        assert small.engine.scheduler.num_preemptions > 0
        assert (small.engine.block_manager.stats().hits > 0) == caching


@pytest.mark.parametrize("gamma", [1, 3, 7])
def test_ngram_speculation_is_greedy_lossless(gamma):
    """16 concurrent requests, each step verifying a different number of drafts per request,
    give exactly plain greedy output."""
    from tests.engine.test_engine import run_staggered

    llm = LLM(dtype="float32", device="cpu", draft="ngram", num_draft_tokens=gamma)
    # copy-heavy prompts make the n-gram drafter propose; chat prompts make it miss
    code = "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n"
    texts = CHATS + [f"Repeat this code exactly:\n{code}", f"Add comments to:\n{code}"] * 4
    prompts = [llm.encode_chat([{"role": "user", "content": t}]) for t in texts]
    params = [SamplingParams(max_tokens=32, temperature=0) for _ in prompts]
    expected = _plain_greedy(prompts, params)
    verify_lengths: list[list[int]] = []
    execute = llm.engine.runner.execute

    def recording_execute(sched_out):
        verify_lengths.append([s.num_draft_tokens for s in sched_out.scheduled if s.sample])
        return execute(sched_out)

    llm.engine.runner.execute = recording_execute
    assert run_staggered(llm, prompts, params, per_step=16) == expected
    assert any(len(set(step)) > 1 for step in verify_lengths), "no step mixed verify lengths"
    assert max(max(step, default=0) for step in verify_lengths) == gamma


_PLAIN_CACHE: dict[tuple, dict[int, list[int]]] = {}


def _plain_greedy(prompts, params) -> dict[int, list[int]]:
    key = tuple(map(tuple, prompts))
    if key not in _PLAIN_CACHE:
        # the reference never reuses a prefix: the engines compared with it do (on by default)
        outs = LLM(dtype="float32", device="cpu", enable_prefix_caching=False).generate(prompts, params)
        _PLAIN_CACHE[key] = {i: o.token_ids for i, o in enumerate(outs)}
    return _PLAIN_CACHE[key]
