"""Prefix caching changes speed only: greedy outputs with the cache on equal those with it
off (fp32, tiny model) for shared-prefix batches, multi-turn chats, preemption under a tiny
KV pool and n > 1, plain and with each learned drafter, whose drafts must not change either
(the drafter's context comes along with the cached blocks)."""

import random

import pytest

from engine import LLM, SamplingParams
from tests.draft.helpers import tiny_dspark, tiny_llm

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def shared_prefix_prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(3, 259) for _ in range(37)]
    other = [rng.randrange(3, 259) for _ in range(21)]
    return ([system + [rng.randrange(3, 259) for _ in range(rng.randrange(1, 9))] for _ in range(6)]
            + [other + [5], other + [6, 7], system[:20] + [9], system])


def serve(llm: LLM, batches: list[list[list[int]]], params: SamplingParams = GREEDY
          ) -> tuple[list[list[int]], list[list], int]:
    """Runs each batch to completion in turn (later batches find earlier ones cached);
    returns outputs, each request's drafts (tokens, confidences) step by step, and the
    tokens the cache served."""
    eng = llm.engine
    drafts: dict[str, list] = {}
    execute = eng.runner.execute

    def recording(sched_out):
        out = execute(sched_out)
        for req_id, d, c in zip(out.req_ids, out.draft_token_ids or [], out.draft_confidences or []):
            if d:  # confidences move with any change of the drafter's context, tokens may not
                drafts.setdefault(req_id, []).append((d, c))
        return out

    eng.runner.execute = recording
    outputs, order, hits_before = {}, [], eng.block_manager.stats().hits
    try:
        for batch in batches:
            ids = [eng.add_request(p, params) for p in batch]
            order += ids
            while eng.has_unfinished():
                outputs.update({o.req_id: o.token_ids for o in eng.step() if o.finished})
    finally:
        del eng.runner.execute
    assert eng.block_manager.usage == 0.0
    return ([outputs[i] for i in order], [drafts.get(i, []) for i in order],
            eng.block_manager.stats().hits - hits_before)


def same_drafts(a: list, b: list) -> bool:
    """Per request and step: equal draft tokens and confidences equal to float noise."""
    flat = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    return len(a) == len(b) and all(len(ra) == len(rb) for ra, rb in zip(a, b)) and all(
        ta == tb and (ca is None) == (cb is None) and (ca is None or ca == pytest.approx(cb, rel=1e-4))
        for (ta, ca), (tb, cb) in flat)


def engines(tiny_model_dir, kind: str | None, **options) -> tuple[LLM, LLM]:
    """(cache off, cache on), with identical drafters where `kind` names one."""
    made = []
    for caching in (False, True):
        drafter = None
        if kind is not None:
            base = tiny_llm(tiny_model_dir, block_size=4)
            drafter = tiny_dspark(base, kind, "markov" if kind in ("dspark", "dflash") else "none").make_drafter(3)
        made.append(tiny_llm(tiny_model_dir, block_size=4, drafter=drafter, enable_prefix_caching=caching,
                             verify_policy="fixed", **options))
    return made[0], made[1]


@pytest.mark.parametrize("kind", [None, "dspark", "dflash", "eagle3", "mtp"])
def test_shared_prefix_batches_and_repeats_equal_the_uncached_run(tiny_model_dir, kind):
    off, on = engines(tiny_model_dir, kind)
    prompts = shared_prefix_prompts()
    batches = [prompts[:4], prompts[4:], prompts[:3]]  # the last batch repeats the first's prompts
    want, want_drafts, no_hits = serve(off, batches)
    got, got_drafts, hits = serve(on, batches)
    assert got == want and no_hits == 0 and hits >= 3 * 36
    if kind is not None:
        assert same_drafts(got_drafts, want_drafts) and any(want_drafts)


@pytest.mark.parametrize("kind", [None, "dspark", "eagle3"])
def test_multi_turn_chat_equals_the_uncached_run(tiny_model_dir, kind):
    """Each turn resends the history plus the model's own last answer."""
    off, on = engines(tiny_model_dir, kind)
    for llm in (off, on):
        history: list[int] = [3, 4, 5, 6, 7, 8, 9]
        llm.turns, llm.drafts, llm.hits = [], [], 0
        for turn in range(4):
            history = history + [20 + turn] * 3
            (answer,), (drafts,), hits = serve(llm, [[history]])
            llm.turns.append(answer)
            llm.drafts.append(drafts)
            llm.hits += hits
            history = history + answer
    assert on.turns == off.turns and same_drafts(on.drafts, off.drafts)
    assert off.hits == 0 and on.hits >= 3 * 8


@pytest.mark.parametrize("kind", [None, "dspark"])
def test_preemption_under_a_tiny_pool_equals_the_uncached_run(tiny_model_dir, kind):
    off, on = engines(tiny_model_dir, kind, num_blocks=24, max_num_batched_tokens=32)
    prompts = shared_prefix_prompts(1)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    want, want_drafts, _ = serve(off, [prompts], params)
    got, got_drafts, hits = serve(on, [prompts], params)
    assert on.engine.scheduler.num_preemptions > 0 and hits > 0
    assert got == want and same_drafts(got_drafts, want_drafts)


def test_n_choices_over_a_cached_prompt_equal_the_uncached_run(tiny_model_dir):
    off, on = engines(tiny_model_dir, "dspark")
    prompt = shared_prefix_prompts()[0]
    seeded = [SamplingParams(max_tokens=8, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2, 3)]
    outs = []
    for llm in (off, on):
        eng = llm.engine
        runs = []
        for _ in range(2):  # the second time the whole group finds the prompt cached
            parent = eng.add_request(prompt, seeded[0])
            ids = [parent] + [eng.add_request(prompt, p, prompt_parent=parent) for p in seeded[1:]]
            done = {}
            while eng.has_unfinished():
                done.update({o.req_id: o for o in eng.step() if o.finished})
            runs.append([done[i] for i in ids])
        outs.append(runs)
    (off_first, off_second), (on_first, on_second) = outs
    tokens = [[o.token_ids for o in run] for run in (off_first, off_second, on_first, on_second)]
    assert tokens[0] == tokens[1] == tokens[2] == tokens[3]
    assert on_second[0].num_cached_tokens >= 36 and off_second[0].num_cached_tokens == 0
