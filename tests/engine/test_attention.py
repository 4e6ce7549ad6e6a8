"""TorchAttention's masked SDPA call: folding each KV head's query heads into rows of one call
gives what grouped-query SDPA gives."""

import pytest
import torch
import torch.nn.functional as F

from engine.attention import masked_attention


@pytest.mark.parametrize(("seqs", "heads", "kv_heads", "rows", "keys"),
                         [(4, 9, 3, 1, 100), (3, 8, 2, 5, 64), (2, 4, 4, 3, 50), (5, 6, 1, 7, 77)])
def test_folded_query_heads_attend_as_grouped_query_attention(seqs, heads, kv_heads, rows, keys):
    generator = torch.Generator().manual_seed(rows)
    q = torch.randn(seqs, heads, rows, 16, generator=generator)
    k, v = (torch.randn(seqs, keys, kv_heads, 16, generator=generator) for _ in range(2))
    # each sequence's rows see a causal prefix of its own length
    context = torch.randint(0, keys - rows, (seqs, 1, 1), generator=generator)
    mask = (torch.arange(keys)[None, None, :] <= context + torch.arange(rows)[None, :, None])[:, None]
    expected = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                              scale=0.25, enable_gqa=True)
    torch.testing.assert_close(masked_attention(q, k, v, mask, 0.25), expected, atol=1e-6, rtol=1e-5)
