"""Confidence-scheduled verification (DSpark, Algorithm 1 and its production variant).

a[r, j] = Π_{i<=j} c[r, i] is request r's chance that draft position j survives. Admitting
one more draft token to a step adds a[r, j] expected tokens and one token of batch size B;
the planner keeps the admissions that maximise expected throughput Θ = τ · SPS(B), where τ
counts the expected committed tokens (one bonus token per request plus the survivals).
"""

from collections.abc import Callable

import numpy as np

StepsPerSecond = Callable[[int], float]


def survival(confidences: np.ndarray) -> np.ndarray:
    """[R, γ] conditional confidences -> [R, γ] cumulative survival probabilities."""
    return np.cumprod(np.clip(confidences, 0.0, 1.0), axis=1)


def admission_order(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and positions of all (r, j) by descending survival; ties keep j ascending, so a
    request's position j always comes after its positions < j (prefixes are respected)."""
    rows, cols = np.indices(a.shape)
    order = np.lexsort((cols.ravel(), -a.ravel()))
    return rows.ravel()[order], cols.ravel()[order]


def plan_verify_lengths(confidences: np.ndarray, sps: StepsPerSecond, *, mode: str = "causal",
                        base_tokens: int | None = None) -> np.ndarray:
    """Verify lengths ℓ_r for R requests from confidences [R, γ].

    mode="causal": Algorithm 1 — admit tokens by descending survival while Θ improves and stop
    at the first that does not (lossless on the current draft's confidences: whether x_k is
    admitted then never depends on x_k itself).
    mode="global": try every admission count K and keep the best, no early stop (jumps over
    jagged SPS cliffs; lossless only when fed confidences from an earlier step).
    `base_tokens` is B before any draft is admitted (default R: one token per request).
    """
    conf = np.asarray(confidences, dtype=np.float64)
    if conf.ndim != 2:
        raise ValueError(f"confidences must be [R, γ], got shape {conf.shape}")
    num_reqs = conf.shape[0]
    lengths = np.zeros(num_reqs, dtype=np.int64)
    if conf.size == 0:
        return lengths
    a = survival(conf)
    rows, cols = admission_order(a)
    base = num_reqs if base_tokens is None else base_tokens
    if mode == "causal":
        tau, batch = float(num_reqs), base
        best = tau * sps(batch)
        for r, j in zip(rows, cols):
            theta = (tau + a[r, j]) * sps(batch + 1)
            if theta <= best:
                break
            tau, batch, best = tau + a[r, j], batch + 1, theta
            lengths[r] = j + 1
        return lengths
    if mode == "global":
        return lengths_from_capacity(a, best_capacity(a, sps, base))
    raise ValueError(f"unknown mode {mode!r}; use 'causal' or 'global'")


def best_capacity(a: np.ndarray, sps: StepsPerSecond, base_tokens: int,
                  draft_seconds: float = 0.0) -> int:
    """The admission count K (draft tokens verified this step) that maximises Θ over all K.

    `draft_seconds`: time the drafter adds to a step that drafts (where drafting does not
    overlap the forward, e.g. on a CPU); a plan with K = 0 lets the drafter rest and saves it.
    """
    rows, cols = admission_order(a)
    gains = np.concatenate([[0.0], np.cumsum(a[rows, cols])])  # expected extra tokens for K
    tau = a.shape[0] + gains
    theta = np.array([t / (1.0 / sps(base_tokens + k) + (draft_seconds if k else 0.0))
                      for k, t in enumerate(tau)])
    return int(np.argmax(theta))


def lengths_from_capacity(a: np.ndarray, capacity: int) -> np.ndarray:
    """Admit the top-`capacity` (r, j) by current survival (rank preserving, prefixes kept)."""
    lengths = np.zeros(a.shape[0], dtype=np.int64)
    rows, cols = admission_order(a)
    for r, j in zip(rows[:capacity], cols[:capacity]):
        lengths[r] = max(lengths[r], j + 1)
    return lengths
