"""The confidence scheduler: Appendix A of the DSpark paper, reproduced by Monte Carlo through
the engine's real rejection sampler, and the load response on a synthetic SPS curve."""

import itertools

import numpy as np
import pytest
import torch

from engine.sampler import Sampler
from scheduler import SamplingParams
from scheduler.request import Request
from scheduler.verify_planner import (
    best_capacity,
    lengths_from_capacity,
    plan_verify_lengths,
    survival,
)
from scheduler.verify_policy import ScheduledVerify

P_T = torch.tensor([0.7, 0.3])
P_D = torch.tensor([0.5, 0.5])
# The exact acceptance probability of each drafted token: min(1, p_t / p_d)
ACCEPT = {0: 1.0, 1: 0.6}
SPS_TABLE = {1: 1.0, 2: 0.5, 3: 0.45}
TRIALS = 40_000


def sps(batch: int) -> float:
    return SPS_TABLE[batch]


def first_token_frequency(lengths_for: "callable", seed: int) -> float:
    """Draft 2 tokens from p_d, plan ℓ with `lengths_for(confidences)`, verify, return P(A)."""
    gen = torch.Generator().manual_seed(seed)
    drafts = torch.multinomial(P_D.expand(TRIALS, 2), 1, replacement=True, generator=gen)
    drafts = drafts.view(TRIALS, 1)
    drafts = torch.cat([drafts, torch.multinomial(P_D.expand(TRIALS, 2), 1, generator=gen)], 1)
    conf = np.vectorize(ACCEPT.get)(drafts.numpy()).astype(float)
    lengths = lengths_for(conf)
    params = [SamplingParams(temperature=1.0)] * TRIALS
    draft_ids = [drafts[i, :lengths[i]].tolist() for i in range(TRIALS)]
    logits = torch.cat([P_T.log().expand(n + 1, 2) for n in lengths.tolist()])
    sampler = Sampler(torch.device("cpu"), seed)
    out = sampler.verify(logits, params, [0] * TRIALS, draft_ids, [P_D.expand(2, 2)] * TRIALS)
    return sum(tokens[0] == 0 for tokens in out.token_ids) / TRIALS


def test_appendix_a_global_mode_on_current_draft_is_biased():
    per_request = lambda c: np.array([plan_verify_lengths(c[i:i + 1], sps, mode="global")[0]
                                      for i in range(len(c))])
    assert abs(first_token_frequency(per_request, seed=1) - 0.85) < 0.01


def test_appendix_a_causal_mode_is_lossless():
    per_request = lambda c: np.array([plan_verify_lengths(c[i:i + 1], sps, mode="causal")[0]
                                      for i in range(len(c))])
    assert abs(first_token_frequency(per_request, seed=2) - 0.70) < 0.01


def test_appendix_a_production_two_steps_earlier_is_lossless():
    """K comes from a global search over the confidences of two steps earlier (an independent
    draft), then this step's tokens are admitted top-K by current survival."""
    rng = np.random.default_rng(3)

    def production(conf: np.ndarray) -> np.ndarray:
        earlier = np.vectorize(ACCEPT.get)(rng.integers(0, 2, size=conf.shape)).astype(float)
        return np.array([lengths_from_capacity(survival(conf[i:i + 1]),
                                               best_capacity(survival(earlier[i:i + 1]), sps, 1))[0]
                         for i in range(len(conf))])

    assert abs(first_token_frequency(production, seed=4) - 0.70) < 0.01


def test_appendix_a_scheduled_policy_is_lossless():
    """The scheduled policy itself, one request per step: its capacity comes from the drafts of
    earlier steps (lagged and typical), never from the one it verifies. With no memory of the
    typical draft (decay 0) a typical capacity taken from the current draft would be Appendix
    A's biased global mode (0.85)."""
    policy = ScheduledVerify(sps)
    policy.typical_decay = 0.0

    def scheduled(conf: np.ndarray) -> np.ndarray:
        return np.array([policy.verify_lengths([_decoding_request(list(row))], base_tokens=1)[0]
                         for row in conf])

    assert abs(first_token_frequency(scheduled, seed=5) - 0.70) < 0.01


def test_one_weak_draft_does_not_rest_a_lone_users_drafter():
    """At one request the lagged capacity is a single draft's: after steady confident drafts,
    one weak draft keeps the drafter going (a typical recent draft still pays), where drafts
    that stay weak let it rest."""
    policy = ScheduledVerify(knee_sps)
    for _ in range(2):  # drafting adds a fifth to a step (the first pass is not charged)
        policy.observe_draft_seconds(0.002)
    for _ in range(10):
        policy.verify_lengths([_decoding_request([0.8] * 7)], base_tokens=1)
    policy.verify_lengths([_decoding_request([0.02] * 7)], base_tokens=1)
    assert policy.last_capacity > 0 and policy.draft_room().positions > 1
    for _ in range(60):
        policy.verify_lengths([_decoding_request([0.02] * 7)], base_tokens=1)
    assert policy.last_capacity == 0 and policy.draft_room().positions == 0


def test_lengths_respect_prefixes_and_bounds():
    conf = np.array([[0.9, 0.9, 0.1], [0.5, 1.0, 1.0], [1.0, 1.0, 1.0]])
    flat = lambda b: 1.0  # free verification: everything is admitted
    assert plan_verify_lengths(conf, flat, mode="global").tolist() == [3, 3, 3]
    assert plan_verify_lengths(conf, flat, mode="causal").tolist() == [3, 3, 3]
    costly = lambda b: 1.0 / b  # every token costs as much as it could gain: nothing admitted
    assert plan_verify_lengths(conf, costly, mode="causal").tolist() == [0, 0, 0]
    assert plan_verify_lengths(np.zeros((0, 4)), flat).tolist() == []
    with pytest.raises(ValueError):
        plan_verify_lengths(conf, flat, mode="bogus")


def knee_sps(batch: int) -> float:
    """Flat (memory-bound) up to 64 tokens per step, then compute-bound: 1/B."""
    return 100.0 if batch <= 64 else 100.0 * 64 / batch


@pytest.mark.parametrize("mode", ["causal", "global"])
def test_verify_length_falls_monotonically_with_load(mode):
    rng = np.random.default_rng(0)
    averages = []
    for num_reqs in [1, 2, 4, 8, 16, 32, 64, 128]:
        conf = rng.uniform(0.5, 0.95, size=(num_reqs, 7))
        averages.append(plan_verify_lengths(conf, knee_sps, mode=mode).mean())
    assert averages[0] == 7.0  # alone, the whole draft fits under the knee
    assert all(x >= y for x, y in itertools.pairwise(averages)), averages
    assert averages[-1] < 0.5  # past the knee speculation backs off


def _decoding_request(conf: list[float]) -> Request:
    req = Request("r", [1, 2, 3], SamplingParams(max_tokens=64))
    req.append_token(4)
    req.num_computed_tokens = 3
    req.draft_token_ids, req.draft_confidences = [7] * len(conf), conf
    return req


def test_scheduled_policy_drafts_what_it_can_verify_and_probes_at_zero_capacity():
    """The scheduled policy asks for K+1 draft positions (K: its latest capacity), rests the
    drafter while K is zero except for one-position probes spaced 8, 16, 32, 64, 64 ... steps
    apart, and recovers as soon as a probe's draft shows that drafts pay again."""
    policy = ScheduledVerify(knee_sps)
    assert policy.draft_room().positions is None  # nothing planned yet: full drafts
    confident = [_decoding_request([0.9] * 7)]
    policy.verify_lengths(confident, base_tokens=1)
    assert policy.last_capacity == 7 and policy.draft_room().positions == 8
    # unlikely drafts on a compute-bound step: no draft pays, the drafter rests
    policy.sps = lambda batch: 1.0 / batch
    policy.verify_lengths([_decoding_request([0.05] * 7)], base_tokens=1)
    assert policy.last_capacity == 0
    rooms = [policy.draft_room() for _ in range(200)]
    asked = [room.positions for room in rooms]
    assert set(asked) == {0, 1}
    # a probe drafts for a sample of the requests, a resting step for none
    assert all(room.is_probe == (room.positions == 1) for room in rooms)
    assert {room.max_requests for room in rooms if room.is_probe} == {policy.probe_requests}
    assert [i for i, n in enumerate(asked) if n] == [7, 7 + 16, 7 + 16 + 32, 7 + 16 + 32 + 64, 7 + 16 + 32 + 128]
    policy.sps = knee_sps  # the probe's draft meets a cheaper step again
    policy.verify_lengths([_decoding_request([0.9])], base_tokens=1)
    assert policy.last_capacity >= 1 and policy.draft_room().positions == policy.last_capacity + 1
    policy.verify_lengths(confident, base_tokens=1)
    assert policy.draft_room().positions == 8
    policy.sps = lambda batch: 1.0 / batch  # and the backoff restarts at 8 steps
    policy.verify_lengths([_decoding_request([0.05] * 7)], base_tokens=1)
    assert [policy.draft_room().positions for _ in range(8)] == [0] * 7 + [1]


def test_policies_rescale_overconfident_drafters_online():
    """Drafts that promise 0.9 per position but are rejected 97% of the time: the running
    realised/expected ratio scales every confidence down (keeping their order), and the
    scheduled policy stops verifying and drafting; honest confidences are left alone."""
    policy = ScheduledVerify(knee_sps)
    promising = [_decoding_request([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]), _decoding_request([0.5] * 7)]
    assert policy.confidence_scale == 1.0
    raw_order = np.argsort(policy.confidences(promising).ravel())
    for i in range(200):
        policy.observe(7, int(i % 33 == 0), [0.9] * 7)
    assert 0.0 < policy.confidence_scale < 0.01 + 1 / 33 / 5
    assert (np.argsort(policy.confidences(promising).ravel()) == raw_order).all()
    policy.sps = lambda batch: 1.0 / batch ** 0.5  # verifying costs something
    for _ in range(policy.lag + 1):
        lengths = policy.verify_lengths(promising, base_tokens=1)
    assert lengths == [0, 0] and policy.draft_room().positions == 0

    honest = ScheduledVerify(knee_sps)
    rng = np.random.default_rng(0)
    for _ in range(500):  # acceptances drawn with the stated conditional probabilities
        accepted = 0
        while accepted < 7 and rng.random() < 0.6:
            accepted += 1
        honest.observe(7, accepted, [0.6] * 7)
    assert abs(honest.confidence_scale - 1.0) < 0.15


def test_prediction_confidences_are_not_rescaled_by_the_drafters_calibration():
    """A prediction's confidence is its own running hit rate: a badly calibrated drafter's
    scale leaves it as it is, while the drafter's own confidences are scaled down."""
    from scheduler.outputs import PREDICTION_SOURCE

    policy = ScheduledVerify(knee_sps)
    for i in range(200):
        policy.observe(7, int(i % 33 == 0), [0.9] * 7)
    drafter, predicted = _decoding_request([0.9] * 7), _decoding_request([0.9] * 7)
    predicted.draft_source = PREDICTION_SOURCE
    conf = policy.confidences([drafter, predicted])
    assert (conf[0] < 0.1).all() and (conf[1] == 0.9).all()


def test_capacity_charges_drafting_time():
    """A drafter pass that costs as much as the gain it brings makes K = 0 (the drafter rests)."""
    a = survival(np.full((4, 7), 0.5))
    def flat(batch: int) -> float:  # verification is free: memory bound
        return 10.0

    assert best_capacity(a, flat, 4) == 28
    assert best_capacity(a, flat, 4, draft_seconds=0.01) > 0  # +10% time for up to +100% tokens
    assert best_capacity(a, flat, 4, draft_seconds=0.2) == 0  # 3x the step for at most 2x tokens
    policy = ScheduledVerify(flat)
    policy.observe_draft_seconds(0.5)  # the first pass builds kernels: not charged
    policy.observe_draft_seconds(0.2)
    policy.verify_lengths([_decoding_request([0.5] * 7)] * 4, base_tokens=4)
    assert policy.last_capacity == 0 and policy.draft_room().positions == 0


def test_one_slow_drafting_pass_does_not_keep_the_drafter_resting():
    """The first pass builds kernels (or a probe catches up context): the capacity search
    charges the median recent pass, so a single slow one does not stop speculation."""
    def flat(batch: int) -> float:
        return 10.0

    policy = ScheduledVerify(flat)
    policy.observe_draft_seconds(0.5)
    assert policy.draft_seconds == 0.0  # the first pass alone is never the estimate
    for seconds in (0.5, 0.01, 0.01):
        policy.observe_draft_seconds(seconds)
    assert policy.draft_seconds == 0.01
    policy.verify_lengths([_decoding_request([0.5] * 7)] * 4, base_tokens=4)
    assert policy.last_capacity > 0


def test_a_probe_draft_is_verified_while_the_drafter_rests():
    """At capacity 0 a plain request's draft is not verified, a probe's is (all of it): its
    realised acceptance is what lets a confidence scale learned elsewhere correct itself."""
    policy = ScheduledVerify(lambda batch: 1.0 / batch)
    policy.verify_lengths([_decoding_request([0.05] * 7)], base_tokens=1)
    policy.verify_lengths([_decoding_request([0.05] * 7)], base_tokens=1)
    assert policy.last_capacity == 0
    plain, probe = _decoding_request([0.05]), _decoding_request([0.05])
    probe.draft_probe = True
    assert policy.verify_lengths([plain, probe], base_tokens=2) == [0, 1]
