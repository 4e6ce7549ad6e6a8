"""The shipped drafters on the real default model: greedy speculation with prefix caching
equals plain greedy without it (fp32, batched, mixed verify lengths, cache hits)."""

import pytest

from engine import LLM, SamplingParams


@pytest.mark.slow
# every shipped checkpoint; the default (dspark) on twice the chats (~4 min), the others on
# one pass (~2 min each on 2 CPU cores)
@pytest.mark.parametrize("draft,gamma,repeats", [("dspark", 7, 2), ("dflash", 7, 1), ("eagle3", 7, 1),
                                                 ("mtp", 1, 1)])
def test_shipped_drafter_is_greedy_lossless(draft, gamma, repeats):
    from tests.engine.test_default_model import CHATS, _plain_greedy
    from tests.engine.test_engine import run_staggered

    # every draft verified (the default scheduled policy mostly rests this small drafter; the
    # server tests check that path end to end)
    llm = LLM(dtype="float32", device="cpu", draft=draft, num_draft_tokens=gamma, verify_policy="fixed")
    prompts = [llm.encode_chat([{"role": "user", "content": t}]) for t in CHATS * repeats]
    params = [SamplingParams(max_tokens=16 + 4 * (i % 3), temperature=0) for i in range(len(prompts))]
    expected = _plain_greedy(prompts, params)
    lengths: list[list[int]] = []
    execute = llm.engine.runner.execute

    def recording(sched_out):
        lengths.append([s.num_draft_tokens for s in sched_out.scheduled if s.sample])
        return execute(sched_out)

    llm.engine.runner.execute = recording
    assert run_staggered(llm, prompts, params, per_step=4) == expected
    # the chats share the template's system prompt: those blocks (and the drafter's context
    # in them) came from the prefix cache
    assert llm.engine.block_manager.stats().hits >= 16 * (len(prompts) - 4)
    assert any(len(set(step)) > 1 for step in lengths), "no step mixed verify lengths"
