"""Speculative sampling is lossless in distribution: with a deliberately bad drafter (random,
peaked draft distributions, so the residual path runs constantly) the first generated tokens
are distributed exactly as plain sampling; and the test notices a biased verifier."""

import collections
import dataclasses
import functools

import pytest
import torch
from scipy.stats import chi2_contingency

from draft import Drafter, DraftInput, Proposal
from engine import LLM, SamplingParams
from engine.sampler import Sampler
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.slow  # 6 x 24k generations: make test runs it, make test-fast skips it

VOCAB = 8
NUM_SAMPLES = 12_000  # the broken verifiers below still score p < 1e-10
PROMPT = [1, 5, 2]


class RandomDrafter(Drafter):
    """Samples each draft token from its own random, sharply peaked distribution, skewed
    towards low token ids (a skew that a verifier without residual correction would leak)."""

    name = "random"

    def __init__(self, num_draft_tokens: int, seed: int = 0) -> None:
        self.num_draft_tokens = num_draft_tokens
        self.gen = torch.Generator().manual_seed(seed)

    def propose(self, inputs: list[DraftInput]) -> list[Proposal]:
        n, k = len(inputs), self.num_draft_tokens
        skew = torch.linspace(2.0, -2.0, VOCAB)
        probs = (3.0 * torch.randn(n, k, VOCAB, generator=self.gen) + skew).softmax(-1)
        tokens = torch.multinomial(probs.view(-1, VOCAB), 1, generator=self.gen).view(n, k)
        return [Proposal(tokens[i].tolist(), probs[i]) for i in range(n)]


class NoResidualSampler(Sampler):
    """A broken verifier: after a rejection it resamples from p_t instead of max(0, p_t - p_d)."""

    @staticmethod
    def recovery_distribution(target, draft_token, draft):
        return target


@pytest.fixture(scope="module")
def tiny_vocab_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("vocab8"), "llama", seed=1, vocab_size=VOCAB,
                           weight_std=0.08)


def first_tokens(path, params: SamplingParams, drafter: Drafter | None, sampler_cls=Sampler,
                 seed: int = 0, prompt: list[int] = PROMPT, **options) -> collections.Counter:
    """Counts of the first 3 tokens of NUM_SAMPLES requests of `prompt`, submitted 4000 at a
    time; `.prefix_hits`: prompt tokens the prefix cache served (later batches find earlier
    batches' prompt blocks)."""
    llm = LLM(model=str(path), device="cpu", dtype="float32", drafter=drafter, seed=seed,
              max_num_seqs=4096, max_num_batched_tokens=16384, num_blocks=8192, block_size=4,
              **options)
    eng = llm.engine
    eng.runner.sampler = sampler_cls(eng.device, seed)
    counts: collections.Counter = collections.Counter()
    for start in range(0, NUM_SAMPLES, 4000):
        for _ in range(min(4000, NUM_SAMPLES - start)):
            eng.add_request(prompt, params)
        while eng.has_unfinished():
            for out in eng.step():
                if out.finished:
                    counts[tuple(out.token_ids[:3])] += 1
    if drafter is not None:
        assert eng.scheduler.num_preemptions == 0
    counts.prefix_hits = eng.block_manager.stats().hits
    return counts


def same_distribution_p(a: collections.Counter, b: collections.Counter) -> float:
    """Chi-square test of homogeneity; cells expected < 5 in total are pooled."""
    keys = sorted(set(a) | set(b))
    big = [k for k in keys if a[k] + b[k] >= 10]
    small = [k for k in keys if a[k] + b[k] < 10]
    table = [[a[k] for k in big] + [sum(a[k] for k in small)],
             [b[k] for k in big] + [sum(b[k] for k in small)]]
    if not small:
        table = [row[:-1] for row in table]
    return chi2_contingency(table)[1]


VARIANTS = {
    "temperature": SamplingParams(max_tokens=4, temperature=1.0, ignore_eos=True),
    "top_k": SamplingParams(max_tokens=4, temperature=0.8, top_k=4, ignore_eos=True),
    "top_p": SamplingParams(max_tokens=4, temperature=1.2, top_p=0.7, ignore_eos=True),
    # each verify row must count the drafts before it: tokens 2 and 3 depend on tokens 1-2
    "penalties": SamplingParams(max_tokens=4, temperature=1.0, frequency_penalty=1.5, presence_penalty=0.5,
                                repetition_penalty=1.3, logit_bias={3: 2.0, 6: -1.0}, min_p=0.02,
                                ignore_eos=True),
}


@functools.cache
def plain_counts(path, variant: str) -> collections.Counter:
    """Plain sampling's counts, shared by the tests that compare against them (read-only)."""
    return first_tokens(path, VARIANTS[variant], None, seed=1)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_speculative_matches_plain_sampling(tiny_vocab_dir, variant):
    params = VARIANTS[variant]
    plain = plain_counts(tiny_vocab_dir, variant)
    spec = first_tokens(tiny_vocab_dir, params, RandomDrafter(3, seed=2), seed=3)
    assert sum(plain.values()) == sum(spec.values()) == NUM_SAMPLES
    assert len(plain) > 20  # the joint of 3 tokens is spread over many cells
    assert same_distribution_p(plain, spec) > 0.001


def test_speculation_over_prefix_cache_hits_matches_plain_sampling(tiny_vocab_dir):
    """Most requests here sample their first token over prompt KV (and drafter context) from
    the prefix cache; plain sampling runs with the cache off."""
    prompt = [1, 5, 2, 7, 3, 3, 6, 1, 4]  # two full blocks of 4, then the last token
    params = VARIANTS["temperature"]
    plain = first_tokens(tiny_vocab_dir, params, None, seed=1, prompt=prompt, enable_prefix_caching=False)
    spec = first_tokens(tiny_vocab_dir, params, RandomDrafter(3, seed=2), seed=3, prompt=prompt)
    assert plain.prefix_hits == 0 and spec.prefix_hits >= 8 * (NUM_SAMPLES - 4000)
    assert sum(plain.values()) == sum(spec.values()) == NUM_SAMPLES
    assert same_distribution_p(plain, spec) > 0.001


def test_penalties_that_ignore_the_drafts_are_detected(tiny_vocab_dir, monkeypatch):
    """Counting only committed tokens in every verify row (a natural mistake) is not lossless,
    and the chi-square test sees it: the penalties variant above has the power to fail."""
    from engine import logits_processor

    params = VARIANTS["penalties"]
    plain = plain_counts(tiny_vocab_dir, "penalties")
    counts = logits_processor.output_counts
    monkeypatch.setattr(logits_processor, "output_counts",
                        lambda out, drafts, vocab, device: counts(out, [], vocab, device).expand(len(drafts) + 1, vocab))
    broken = first_tokens(tiny_vocab_dir, params, RandomDrafter(3, seed=2), seed=3)
    assert same_distribution_p(plain, broken) < 0.001


def test_biased_verifier_is_detected(tiny_vocab_dir):
    params = VARIANTS["temperature"]
    plain = plain_counts(tiny_vocab_dir, "temperature")
    biased = first_tokens(tiny_vocab_dir, params, RandomDrafter(3, seed=2), NoResidualSampler, seed=3)
    assert same_distribution_p(plain, biased) < 0.001


def seeded_outputs(path, params: list[SamplingParams], drafter: Drafter | None) -> tuple[list[list[int]], int]:
    """Token ids of seeded requests in order, and how many drafts were accepted."""
    llm = LLM(model=str(path), device="cpu", dtype="float32", drafter=drafter, seed=0,
              max_num_seqs=512, max_num_batched_tokens=4096, num_blocks=4096, block_size=4)
    eng = llm.engine
    ids = {eng.add_request(PROMPT, p): i for i, p in enumerate(params)}
    out: list[list[int]] = [[] for _ in params]
    accepted = 0
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                out[ids[o.req_id]] = o.token_ids
                accepted += o.num_accepted_tokens
    return out, accepted


def test_seeded_race_samples_the_target_distribution(tiny_vocab_dir):
    """Seeded tokens are exponential-race winners: distributed as unseeded plain sampling."""
    base = VARIANTS["penalties"]
    seeded, _ = seeded_outputs(tiny_vocab_dir, [dataclasses.replace(base, seed=s) for s in range(NUM_SAMPLES // 8)], None)
    plain = plain_counts(tiny_vocab_dir, "penalties")
    assert same_distribution_p(plain, collections.Counter(tuple(t[:3]) for t in seeded)) > 0.001


@pytest.mark.parametrize("variant", ["temperature", "penalties"])
def test_seeded_output_does_not_depend_on_the_drafts(tiny_vocab_dir, variant):
    """A seeded request emits plain seeded decoding's tokens whatever a drafter proposes and
    however many drafts each step verifies (the race coupling); drafts are still accepted."""
    params = [dataclasses.replace(VARIANTS[variant], seed=s, max_tokens=8) for s in range(300)]
    plain, _ = seeded_outputs(tiny_vocab_dir, params, None)
    for gamma in (1, 3):
        spec, accepted = seeded_outputs(tiny_vocab_dir, params, RandomDrafter(gamma, seed=gamma))
        assert spec == plain and accepted > 100
