"""Speculative sampling with a (random, hence badly matched) DSpark drafter is lossless in
distribution: the first generated tokens match plain sampling (issue 4's statistical test)."""

import pytest

from engine import SamplingParams
from tests.draft.helpers import tiny_dspark, tiny_llm
from tests.engine.test_speculative_stats import (
    NUM_SAMPLES,
    first_tokens,
    same_distribution_p,
    tiny_vocab_dir,  # noqa: F401 (fixture)
)


@pytest.mark.slow
@pytest.mark.parametrize("head, policy, overlap", [("markov", "fixed", False),
                                                   ("markov", "scheduled", True)])
def test_dspark_speculation_matches_plain_sampling(tiny_vocab_dir, head, policy, overlap):  # noqa: F811
    """Also under confidence-scheduled verification with the overlapped engine (issue 6)."""
    params = SamplingParams(max_tokens=4, temperature=1.0, ignore_eos=True)
    drafter = tiny_dspark(tiny_llm(tiny_vocab_dir), "dspark", head, seed=3, scale=2.0).make_drafter(3)
    plain = first_tokens(tiny_vocab_dir, params, None, seed=1)
    spec = first_tokens(tiny_vocab_dir, params, drafter, seed=3, verify_policy=policy, overlap=overlap)
    assert sum(plain.values()) == sum(spec.values()) == NUM_SAMPLES
    assert same_distribution_p(plain, spec) > 0.001
