"""Speculative sampling with a (random, hence badly matched) DSpark drafter is lossless in
distribution: the first generated tokens match plain sampling (issue 4's statistical test)."""

import pytest
import torch

from engine import SamplingParams
from tests.draft.helpers import tiny_dspark, tiny_llm
from tests.engine.test_speculative_stats import (
    NUM_SAMPLES,
    VOCAB,
    first_tokens,
    same_distribution_p,
    tiny_vocab_dir,  # noqa: F401 (fixture)
)


@pytest.mark.slow
@pytest.mark.parametrize("head, policy, overlap, draft_vocab", [("markov", "fixed", False, 0),
                                                                ("markov", "scheduled", True, 0),
                                                                ("rnn", "fixed", False, VOCAB // 2)])
def test_dspark_speculation_matches_plain_sampling(tiny_vocab_dir, head, policy, overlap, draft_vocab):  # noqa: F811
    """Also under confidence-scheduled verification with the overlapped engine (issue 6), and
    with a draft vocabulary that cannot propose half the tokens."""
    params = SamplingParams(max_tokens=4, temperature=1.0, ignore_eos=True)
    model = tiny_dspark(tiny_llm(tiny_vocab_dir), "dspark", head, seed=3, scale=2.0, draft_vocab_size=draft_vocab)
    if draft_vocab:
        model.draft_vocab.copy_(torch.arange(0, VOCAB, 2))  # every other token
    drafter = model.make_drafter(3)
    plain = first_tokens(tiny_vocab_dir, params, None, seed=1)
    spec = first_tokens(tiny_vocab_dir, params, drafter, seed=3, verify_policy=policy, overlap=overlap)
    assert sum(plain.values()) == sum(spec.values()) == NUM_SAMPLES
    assert same_distribution_p(plain, spec) > 0.001
