"""Tensor parallelism on CPU over gloo: the split arithmetic, then the real default model with
two ranks against one (greedy output token for token, with and without the DSpark drafter;
prefill logits)."""

from itertools import pairwise

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import ModelArchConfig
from engine.tensor_parallel import check_size, local_arch, split, vocab_chunk
from tests.engine.test_default_model import CHATS


@pytest.mark.parametrize("n,world", [(3, 2), (9, 2), (1536, 2), (7, 3), (4, 4)])
def test_split_covers_everything_once_as_evenly_as_possible(n, world):
    parts = [split(n, world, r) for r in range(world)]
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a[1] == b[0] for a, b in pairwise(parts))
    sizes = [hi - lo for lo, hi in parts]
    assert max(sizes) - min(sizes) <= 1


def test_heads_split_by_kv_group():
    arch = ModelArchConfig(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                           num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)
    ranks = [local_arch(arch, r, 2) for r in range(2)]
    assert [(a.num_heads, a.num_kv_heads) for a in ranks] == [(6, 2), (3, 1)]
    assert vocab_chunk(49152, 2) * 2 == 49152 and vocab_chunk(10, 3) == 4
    check_size(arch, 3)
    with pytest.raises(ValueError, match="3 KV heads"):
        check_size(arch, 4)


@pytest.fixture(scope="module")
def tp2_llm():
    llm = LLM(dtype="float32", device="cpu", tensor_parallel_size=2, draft="dspark")
    yield llm
    llm.engine.close()


@pytest.mark.slow
def test_prefill_logits_agree_with_one_rank(tp2_llm, default_llm):
    ids = default_llm.encode_chat([{"role": "user", "content": CHATS[0]}])
    ours, ref = tp2_llm.engine.prompt_logits(ids), default_llm.engine.prompt_logits(ids)
    # the row-parallel sums round differently in fp32 (30 layers of two-part sums): measured
    # max |Δ| 1.35e-4, 8 of 2.3M logits beyond 1e-4
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "dspark"])
def test_greedy_output_equals_one_rank(tp2_llm, default_llm, speculative):
    """8 chats x 64 tokens in one batch; with the DSpark drafter (replicated on rank 0, verify
    steps of mixed lengths across the ranks) and with speculation off per request."""
    prompts = [default_llm.encode_chat([{"role": "user", "content": c}]) for c in CHATS]
    params = SamplingParams(max_tokens=64, temperature=0, speculative=speculative)
    engine = tp2_llm.engine
    ids = [engine.add_request(p, params) for p in prompts]
    ours: dict[str, list[int]] = {}
    accepted = 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                ours[out.req_id] = out.token_ids
        accepted += engine.last_step.num_accepted
    ref = default_llm.generate(prompts, SamplingParams(max_tokens=64, temperature=0))
    assert [ours[i] for i in ids] == [r.token_ids for r in ref]
    assert (accepted > 0) == speculative  # with the drafter, its tokens were verified across ranks
