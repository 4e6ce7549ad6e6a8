"""n > 1: choices of one prompt share its prefill through forked KV blocks (and the drafter's
context of the shared positions), with outputs identical to independent requests. Counts of
computed tokens are taken with the prefix cache off (it would serve the repeated runs)."""

import pytest

from engine import SamplingParams
from tests.draft.helpers import tiny_dspark, tiny_llm
from tests.engine.test_prefix_caching import same_drafts

PROMPT = list(range(3, 45))  # 42 tokens: 40 shared in blocks of 4, the last 2 per choice


def _run(llm, params: list[SamplingParams], share: bool, abort_parent: bool = False):
    eng = llm.engine
    parent = eng.add_request(PROMPT, params[0])
    ids = [parent] + [eng.add_request(PROMPT, p, prompt_parent=parent if share else None) for p in params[1:]]
    if abort_parent:
        eng.abort_request(parent)
        ids = ids[1:]
    done, computed = {}, 0
    proposals: dict[str, list] = {i: [] for i in ids}
    execute = eng.runner.execute

    def recording(sched_out):
        out = execute(sched_out)
        for req_id, draft, conf in zip(out.req_ids, out.draft_token_ids or [], out.draft_confidences or []):
            if draft and req_id in proposals:  # confidences move with any change of context
                proposals[req_id].append((draft, conf))
        return out

    eng.runner.execute = recording
    try:
        while eng.has_unfinished():
            outs = eng.step()
            computed += eng.last_step.num_scheduled_tokens if eng.last_step else 0
            done.update({o.req_id: o for o in outs if o.finished})
    finally:
        del eng.runner.execute
    _run.proposals = [proposals[i] for i in ids]  # the drafts each request got, step by step
    return [done[i] for i in ids], computed


SEEDED = [SamplingParams(max_tokens=12, temperature=1.0, seed=s, ignore_eos=True) for s in (10, 11, 12)]


@pytest.mark.parametrize("chunk", [512, 16])
def test_shared_prefill_equals_independent_requests(tiny_model_dir, chunk):
    llm = tiny_llm(tiny_model_dir, block_size=4, max_num_batched_tokens=chunk, enable_prefix_caching=False)
    alone, computed_alone = _run(llm, SEEDED, share=False)
    shared, computed_shared = _run(llm, SEEDED, share=True)
    assert [o.token_ids for o in shared] == [o.token_ids for o in alone]
    assert len({tuple(o.token_ids) for o in shared}) == 3  # the seeds differ
    assert computed_alone - computed_shared == 2 * 40  # two choices skipped the shared 40 tokens
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


@pytest.mark.parametrize("caching", [False, True])
@pytest.mark.parametrize("kind", ["dspark", "eagle3", "mtp"])
def test_forked_choices_draft_from_the_shared_context(tiny_model_dir, kind, caching):
    """Greedy drafts depend only on the drafter's context: a forked choice (or, with the
    prefix cache, any run after the first) that lacked the shared positions' context would
    draft (and have accepted) differently."""
    plain = tiny_llm(tiny_model_dir, block_size=4)
    greedy = [SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)] * 3
    reference = _run(plain, greedy[:1], share=False)[0][0].token_ids
    for chunk in (512, 16):
        llm = tiny_llm(tiny_model_dir, block_size=4, max_num_batched_tokens=chunk, verify_policy="fixed")
        llm = tiny_llm(tiny_model_dir, block_size=4, max_num_batched_tokens=chunk, verify_policy="fixed",
                       drafter=tiny_dspark(llm, kind, "markov" if kind == "dspark" else "none").make_drafter(3),
                       enable_prefix_caching=caching)
        first = _run(llm, greedy[:1], share=False)[0]
        first_drafts = _run.proposals
        alone = _run(llm, greedy, share=False)[0]
        alone_drafts = _run.proposals
        shared = _run(llm, greedy, share=True)[0]
        assert all(o.token_ids == reference for o in first + alone + shared)
        assert first_drafts[0] and same_drafts(alone_drafts, first_drafts * 3)
        assert same_drafts(_run.proposals, alone_drafts)
        assert alone[0].num_cached_tokens == (40 if caching else 0)


def test_choices_of_an_aborted_parent_prefill_alone(tiny_model_dir):
    llm = tiny_llm(tiny_model_dir, block_size=4, enable_prefix_caching=False)
    alone = _run(llm, SEEDED, share=False)[0]
    orphans, computed = _run(llm, SEEDED, share=True, abort_parent=True)
    assert [o.token_ids for o in orphans] == [o.token_ids for o in alone[1:]]
    assert computed == 2 * (len(PROMPT) + 11)  # each prefilled its whole prompt itself
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
