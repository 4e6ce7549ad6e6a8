"""Verify policies: how many of its draft tokens each decoding request verifies this step.

`fixed` verifies every proposed token, `none` none. The confidence-scheduled ones weigh the
drafter's per-position confidences against the engine's measured throughput curve (SPS):
`causal` is Algorithm 1 on the current draft; `scheduled` is the production variant, whose
capacity K comes from confidences two steps old (so it cannot depend on the current draft)
and is filled top-K by current survival; `threshold` admits positions whose survival clears
a static bar. Drafters without confidences get a running estimate of the acceptance rate.

Confidences are calibrated offline (STS) on sampled continuations of the training prompts; the
traffic actually served (greedy requests, other domains) can accept more or less. Every policy
therefore rescales them by the running ratio of realised to expected accepted tokens. One
factor for all requests keeps their order, and it depends only on steps already verified, so
the plans stay as lossless as before.
"""

from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass

import numpy as np

from scheduler.outputs import PREDICTION_SOURCE
from scheduler.request import Request
from scheduler.verify_planner import (
    StepsPerSecond,
    best_capacity,
    lengths_from_capacity,
    plan_verify_lengths,
    survival,
)


@dataclass(frozen=True, slots=True)
class DraftRoom:
    """What the drafter proposes after a step: at most `positions` tokens per request (None:
    its γ; 0: none, only its context grows), for at most `max_requests` of the requests that
    sample (None: all of them). A room with `max_requests` is a probe: a sample of requests
    drafts so that the capacity can recover, at a fraction of a full pass's cost."""

    positions: int | None = None
    max_requests: int | None = None

    @property
    def is_probe(self) -> bool:
        return self.max_requests is not None


class VerifyPolicy(ABC):
    name: str

    # memory of the realised / expected acceptance ratio, in verified requests
    recalibration_decay = 0.99

    def __init__(self) -> None:
        # running acceptance rate, the confidence of drafters that give none
        self.acceptance_prior = 0.5
        self._realised = self._expected = 0.0  # decayed sums of accepted tokens

    @abstractmethod
    def verify_lengths(self, requests: list[Request], base_tokens: int) -> list[int]:
        """ℓ_r for each decoding request, each in 0..len(r.draft_token_ids). `base_tokens`
        counts the step's tokens before any draft is added."""

    def draft_room(self) -> DraftRoom:
        """What is worth proposing for the next step (default: γ positions for everyone)."""
        return DraftRoom()

    @property
    def context_pool(self) -> int | None:
        """While the drafter rests: how many running requests keep drafter context (the pool
        its probes sample); later admissions decode plain for life. None: not resting."""
        return None

    def observe_draft_seconds(self, seconds: float) -> None:
        """Time of a step's full drafting pass (policies that weigh it override this)."""

    def observe(self, num_verified: int, num_accepted: int, confidences: list[float] | None,
                source: str = "") -> None:
        """One request's verification: `confidences` are the (raw) ones of the draft, `source`
        what proposed it."""
        if not num_verified:
            return
        self.acceptance_prior = 0.9 * self.acceptance_prior + 0.1 * num_accepted / num_verified
        if confidences is not None and _drafter_calibrated(source):
            d = self.recalibration_decay
            self._realised = d * self._realised + num_accepted
            self._expected = d * self._expected + float(np.cumprod(confidences[:num_verified]).sum())

    @property
    def confidence_scale(self) -> float:
        """Realised / expected accepted tokens (1 until a few tokens were expected)."""
        if self._expected < 2.0:
            return 1.0
        return float(np.clip(self._realised / self._expected, 0.01, 4.0))

    def confidences(self, requests: list[Request]) -> np.ndarray:
        """[R, γ] conditional confidences, zero-padded past each request's proposal; drafter
        confidences rescaled online (module docstring)."""
        width = max(len(r.draft_token_ids) for r in requests)
        conf = np.zeros((len(requests), width))
        scale = self.confidence_scale
        for i, r in enumerate(requests):
            n = len(r.draft_token_ids)
            if r.draft_confidences is None:
                conf[i, :n] = self.acceptance_prior
            elif not _drafter_calibrated(r.draft_source):
                conf[i, :n] = r.draft_confidences[:n]
            else:
                conf[i, :n] = np.minimum(np.asarray(r.draft_confidences[:n]) * scale, 1.0)
        return conf


def _drafter_calibrated(source: str) -> bool:
    """Whether confidences of this source are the drafter's calibrated ones, which the online
    recalibration measures and rescales; a prediction's are its own running hit rate."""
    return source != PREDICTION_SOURCE


class FixedVerify(VerifyPolicy):
    """Verify every proposed draft token (ℓ_r = the proposal's length, at most γ)."""

    name = "fixed"

    def verify_lengths(self, requests: list[Request], base_tokens: int) -> list[int]:
        return [len(r.draft_token_ids) for r in requests]


class NoVerify(VerifyPolicy):
    """Plain decoding even when drafts exist (a baseline)."""

    name = "none"

    def verify_lengths(self, requests: list[Request], base_tokens: int) -> list[int]:
        return [0] * len(requests)


class ThresholdVerify(VerifyPolicy):
    """Verify the prefix whose cumulative survival stays at or above a fixed threshold."""

    name = "threshold"

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = threshold

    def verify_lengths(self, requests: list[Request], base_tokens: int) -> list[int]:
        a = survival(self.confidences(requests))
        return (a >= self.threshold).sum(axis=1).tolist()


class CausalVerify(VerifyPolicy):
    """Algorithm 1 with early stop on the current draft's confidences."""

    name = "causal"

    def __init__(self, sps: StepsPerSecond) -> None:
        super().__init__()
        self.sps = sps

    def verify_lengths(self, requests: list[Request], base_tokens: int) -> list[int]:
        conf = self.confidences(requests)
        return plan_verify_lengths(conf, self.sps, mode="causal", base_tokens=base_tokens).tolist()


class ScheduledVerify(VerifyPolicy):
    """Production variant: capacity K from a global search two steps earlier, filled top-K by
    the current draft's survival probabilities (rank preserving, prefixes respected). The
    search charges a step that verifies drafts the measured drafting time too: the drafter
    runs on the same device as the forward, and rests when K = 0."""

    name = "scheduled"
    lag = 2
    # While the capacity is zero, a one-position probe draft every `probe_every` steps; each
    # probe that finds nothing doubles the wait, up to `max_probe_every`. A probe drafts for
    # at most `probe_requests` requests (the scheduler rotates them): its confidences are a
    # sample of what drafting would bring, and its pass costs a fraction of a full one.
    probe_every = 8
    max_probe_every = 64
    probe_requests = 4
    # While resting, requests admitted beyond this many skip drafter context for life: a
    # resting drafter otherwise costs every request a context pass per block (c = 32 here:
    # 2.3 ms of a 98 ms step) for drafts that may never come.
    resting_context_requests = 8
    # per-step decay of the typical draft's confidences (about the last ten steps' drafts)
    typical_decay = 0.9

    def __init__(self, sps: StepsPerSecond) -> None:
        super().__init__()
        self.sps = sps
        self._capacities: deque[int] = deque(maxlen=self.lag)
        self._idle_steps = 0
        self._probe_wait = self.probe_every
        # recent full drafting-pass times (probes excluded: they draft for a few requests);
        # their median is what drafting adds to a step (it does not overlap the forward
        # here). A median ignores the odd slow pass (the first one builds kernels) that would
        # keep a resting drafter from ever paying again.
        self._draft_times: deque[float] = deque(maxlen=9)
        self._drafter_warm = False
        # decayed per-position sums of recent drafts' (rescaled) conditional confidences and
        # of how many drafts reached each position: their ratio is a typical draft
        self._typical_sums = np.zeros(0)
        self._typical_counts = np.zeros(0)

    @property
    def draft_seconds(self) -> float:
        return float(np.median(self._draft_times)) if self._draft_times else 0.0

    def observe_draft_seconds(self, seconds: float) -> None:
        if not self._drafter_warm:  # the first pass builds kernels: 9.3 ms against 5.1-5.4 after (c = 1)
            self._drafter_warm = True
            return
        self._draft_times.append(seconds)

    def draft_room(self) -> DraftRoom:
        """Draft what the latest global search says the plan can verify, plus one position
        so the capacity can grow. At a zero capacity speculation cannot pay at this load or
        confidence, so the drafter rests (saving its whole pass) except for one-position probe
        drafts of a few requests, spaced further apart while they find nothing, whose
        confidences let the capacity recover. Which drafts exist never changes how they are
        verified: lossless."""
        recent = self.last_capacity
        if recent is None:
            return DraftRoom()
        if recent > 0:
            self._idle_steps, self._probe_wait = 0, self.probe_every
            return DraftRoom(recent + 1)
        self._idle_steps += 1
        if self._idle_steps < self._probe_wait:
            return DraftRoom(0)
        self._idle_steps, self._probe_wait = 0, min(2 * self._probe_wait, self.max_probe_every)
        return DraftRoom(1, self.probe_requests)

    def verify_lengths(self, requests: list[Request], base_tokens: int) -> list[int]:
        conf = self.confidences(requests)
        a = survival(conf)
        # The capacity a typical recent draft earns at this load (past drafts only: lossless).
        # With few requests the lagged capacity is one draft's: a single weak draft would
        # otherwise rest a lone user's drafter until the next probe.
        typical = self._typical_capacity(len(requests), base_tokens)
        if len(self._capacities) == self.lag:
            capacity = max(self._capacities[0], typical)
        else:  # warm-up: plan from the prior alone, which the current draft cannot influence
            prior = survival(np.full(a.shape, self.acceptance_prior))
            capacity = best_capacity(prior, self.sps, base_tokens, self.draft_seconds)
        self._capacities.append(max(best_capacity(a, self.sps, base_tokens, self.draft_seconds), typical))
        self._observe_typical(conf, [len(r.draft_token_ids) for r in requests])
        lengths = lengths_from_capacity(a, capacity)
        # A probe's draft is verified whatever the capacity: its realised acceptance is what
        # corrects confidences calibrated for other traffic (greedy requests accept about
        # twice what the T = 1 calibration predicts), which a resting drafter would never see
        # otherwise. Whether a request probes was settled before its draft existed: lossless.
        for i, r in enumerate(requests):
            if r.draft_probe:
                lengths[i] = max(lengths[i], len(r.draft_token_ids))
        return lengths.tolist()

    def _observe_typical(self, conf: np.ndarray, lengths: list[int]) -> None:
        width = conf.shape[1]
        if width > self._typical_sums.size:
            grow = width - self._typical_sums.size
            self._typical_sums = np.pad(self._typical_sums, (0, grow))
            self._typical_counts = np.pad(self._typical_counts, (0, grow))
        reached = np.arange(width)[None, :] < np.asarray(lengths)[:, None]  # [R, width]
        d = self.typical_decay
        self._typical_sums *= d
        self._typical_counts *= d
        self._typical_sums[:width] += np.where(reached, conf, 0.0).sum(axis=0)
        self._typical_counts[:width] += reached.sum(axis=0)

    def _typical_capacity(self, num_requests: int, base_tokens: int) -> int:
        """K for `num_requests` drafts like the recent ones (positions no recent draft
        reached count as rejected)."""
        counts = self._typical_counts
        if not counts.size or counts[0] <= 0.0:
            return 0
        mean = np.divide(self._typical_sums, counts, out=np.zeros_like(counts), where=counts > 1e-3)
        a = np.tile(survival(mean[None, :]), (num_requests, 1))
        return best_capacity(a, self.sps, base_tokens, self.draft_seconds)

    @property
    def last_capacity(self) -> int | None:
        return self._capacities[-1] if self._capacities else None

    @property
    def context_pool(self) -> int | None:
        return self.resting_context_requests if self.last_capacity == 0 else None


def make_verify_policy(name: str, sps: StepsPerSecond | None = None,
                       threshold: float = 0.5) -> VerifyPolicy:
    if name in ("causal", "scheduled") and sps is None:
        raise ValueError(f"the {name!r} verify policy needs an SPS profile")
    factories = {
        "fixed": FixedVerify, "none": NoVerify,
        "threshold": lambda: ThresholdVerify(threshold),
        "causal": lambda: CausalVerify(sps), "scheduled": lambda: ScheduledVerify(sps),
    }
    if name not in factories:
        raise ValueError(f"unknown verify policy {name!r}; available: {sorted(factories)}")
    return factories[name]()
