"""Injected faults inside the engine: non-finite logits stop only their own request and never
become tokens; a drafter that raises is dropped and decoding goes on, still exact."""

import pytest
import torch

from draft import NgramDrafter
from engine import LLM, SamplingParams
from engine.model_runner import _guard_non_finite
from tests.engine.test_engine import random_prompts, tiny_llm

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def poison_rows(llm: LLM, rows: list[int], times: int = 1) -> None:
    """The next `times` logits computations of the sampled rows return NaN in `rows`."""
    model = llm.engine.model
    original = model.compute_logits
    left = [times]

    def compute_logits(hidden: torch.Tensor) -> torch.Tensor:
        logits = original(hidden)
        if left[0] and logits.shape[0] > max(rows):
            left[0] -= 1
            logits = logits.clone()
            logits[rows, 5] = float("nan")  # one bad value is enough
        return logits

    model.compute_logits = compute_logits


def test_guard_maps_bad_rows_to_requests():
    logits = torch.zeros(6, 10)  # requests of 1, 3 and 2 rows
    logits[2, 4] = float("inf")
    safe, broken = _guard_non_finite(logits, [[], [7, 8], [9]])
    assert broken == {1}
    assert bool(safe.isfinite().all())
    assert _guard_non_finite(torch.zeros(3, 4), [[], [], []])[1] == set()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_logits_stop_only_their_request(tiny_model_dir, temperature):
    prompts = random_prompts(3, seed=5)
    params = SamplingParams(max_tokens=12, temperature=temperature, seed=3, ignore_eos=True)
    clean = tiny_llm(tiny_model_dir).generate(prompts, params)
    llm = tiny_llm(tiny_model_dir)
    eng = llm.engine
    ids = [eng.add_request(p, params) for p in prompts]
    eng.step()  # prefills (no logits sampled for a NaN to hit before this step ends)
    poison_rows(llm, [1])  # the second request's row of the next decode step
    finals = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                finals[out.req_id] = out
    assert finals[ids[1]].finish_reason == "error"
    assert len(finals[ids[1]].token_ids) < 12  # it stopped: nothing from the NaN step came out
    for i in (0, 2):
        assert finals[ids[i]].token_ids == clean[i].token_ids
        assert finals[ids[i]].finish_reason == "length"
    assert eng.block_manager.usage == 0.0
    assert llm.generate([prompts[1]], params)[0].token_ids == clean[1].token_ids  # still serving


class FailingDrafter(NgramDrafter):
    """An n-gram drafter whose `propose` raises on its `fail_at`-th call."""

    def __init__(self, num_draft_tokens: int, fail_at: int) -> None:
        super().__init__(num_draft_tokens)
        self.calls = 0
        self.fail_at = fail_at

    def propose(self, inputs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected drafter bug")
        return super().propose(inputs)


def test_a_drafter_that_raises_is_dropped_and_outputs_stay_exact(tiny_model_dir):
    prompts = [p * 3 for p in random_prompts(4, seed=2)]  # repetitive: the n-gram drafter drafts
    plain = tiny_llm(tiny_model_dir).generate(prompts, GREEDY)
    drafter = FailingDrafter(4, fail_at=3)
    llm = LLM(model=str(tiny_model_dir), device="cpu", dtype="float32", drafter=drafter)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert llm.engine.runner.drafter is None and llm.engine.runner.drafting_failed
    assert drafter.calls == 3  # never called again
    assert llm.generate(prompts[:1], GREEDY)[0].token_ids == plain[0].token_ids
