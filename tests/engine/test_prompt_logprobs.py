"""Prompt logprobs: each prompt token's raw log-probability, equal to the log-softmax of one
whole prefill's logits, whatever the chunking, preemption, n > 1 sharing or speculation."""

import pytest

from engine import SamplingParams
from tests.draft.helpers import tiny_dspark, tiny_llm
from tests.engine.test_engine import random_prompts

TOP = 3


def _check(llm, prompt: list[int], scored) -> None:
    logp = llm.prompt_logits(prompt).float().log_softmax(-1)
    assert scored is not None and len(scored) == len(prompt) and scored[0] is None
    for i, lp in enumerate(scored[1:], start=1):
        assert lp.token_id == prompt[i]
        assert lp.logprob == pytest.approx(logp[i - 1, prompt[i]].item(), abs=1e-5)
        top = logp[i - 1].topk(TOP)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-5)


def _outputs(llm, prompts, params):
    eng = llm.engine
    ids = {eng.add_request(p, sp): i for i, (p, sp) in enumerate(zip(prompts, params))}
    first, last = {}, {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.token_ids and ids[o.req_id] not in first:
                first[ids[o.req_id]] = o
            if o.finished:
                last[ids[o.req_id]] = o
    return first, last


@pytest.mark.parametrize("chunk", [512, 7])
def test_prompt_logprobs_equal_one_prefills_log_softmax(tiny_model_dir, chunk):
    llm = tiny_llm(tiny_model_dir, block_size=4, max_num_batched_tokens=chunk)
    prompts = [p * 2 for p in random_prompts(3, seed=4)]
    # temperature and penalties do not enter: the prompt is scored by the raw logits
    params = [SamplingParams(max_tokens=4, temperature=0.7, presence_penalty=1.0, prompt_logprobs=TOP,
                             ignore_eos=True), SamplingParams(max_tokens=4, ignore_eos=True),
              SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=0, ignore_eos=True)]
    first, last = _outputs(llm, prompts, params)
    _check(llm, prompts[0], first[0].prompt_logprobs)
    assert last[0].prompt_logprobs == first[0].prompt_logprobs  # every output carries them
    assert first[1].prompt_logprobs is None
    assert all(lp.top == () for lp in first[2].prompt_logprobs[1:])


def test_prompt_logprobs_survive_preemption(tiny_model_dir):
    prompts = random_prompts(16, seed=6)
    params = [SamplingParams(max_tokens=10, temperature=0, prompt_logprobs=TOP, ignore_eos=True)] * 16
    small = tiny_llm(tiny_model_dir, block_size=4, num_blocks=40, max_num_batched_tokens=32)
    first, _ = _outputs(small, prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    for i, p in enumerate(prompts):
        _check(small, p, first[i].prompt_logprobs)


def test_choices_and_speculation_get_the_same_prompt_logprobs(tiny_model_dir):
    plain = tiny_llm(tiny_model_dir, block_size=4)
    llm = tiny_llm(tiny_model_dir, block_size=4, verify_policy="fixed",
                   drafter=tiny_dspark(plain, "dspark", "markov").make_drafter(3))
    prompt = list(range(3, 45))
    params = SamplingParams(max_tokens=8, temperature=0, prompt_logprobs=TOP, ignore_eos=True)
    eng = llm.engine
    parent = eng.add_request(prompt, params)
    ids = [parent] + [eng.add_request(prompt, params, prompt_parent=parent) for _ in range(2)]
    done = {}
    while eng.has_unfinished():
        done.update({o.req_id: o for o in eng.step() if o.finished})
    assert done[parent].num_draft_tokens > 0
    for i in ids:
        _check(plain, prompt, done[i].prompt_logprobs)


def test_prompt_logprobs_are_validated():
    from scheduler.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="prompt logprobs"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(InvalidRequest, match="prompt logprobs"):
        SamplingParams(prompt_logprobs=-1)
