"""Inverse-CDF row sampling: draws follow each row's distribution, never a zero-mass token."""

import torch
from scipy.stats import chisquare

from engine.sampler import sample_rows


def test_sample_rows_follows_each_row_and_skips_zero_mass():
    gen = torch.Generator().manual_seed(0)
    rows = torch.tensor([[0.0, 2.0, 0.0, 1.0, 1.0, 0.0],   # unnormalised, zeros between
                         [0.5, 0.0, 0.0, 0.0, 0.0, 0.5],
                         [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])   # all mass on the last token
    n = 20000
    u = torch.rand(n, rows.shape[0], dtype=torch.float64, generator=gen)
    draws = torch.stack([sample_rows(rows, u[i]) for i in range(n)])  # [n, 3]
    for r in range(rows.shape[0]):
        counts = torch.bincount(draws[:, r], minlength=rows.shape[1]).double()
        support = rows[r] > 0
        assert counts[~support].sum() == 0
        if support.sum() > 1:
            expected = rows[r][support].double() / rows[r].sum() * n
            assert chisquare(counts[support], expected).pvalue > 1e-3
    # the edges of [0, 1) map to the first and the last token with mass
    edges = sample_rows(rows[:1].expand(2, -1), torch.tensor([0.0, 1.0 - 1e-12], dtype=torch.float64))
    assert edges.tolist() == [1, 4]
