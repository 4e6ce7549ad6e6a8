"""Random anchor sampling over target-generated sequences.

An anchor is a committed token at position a from which a block of γ draft positions
predicts tokens a+1..a+γ. At inference the first anchor is the first generated token, so anchors
lie in the response: a ∈ [num_prompt_tokens, T - 2] (T tokens have target states; position a+j
is supervised while a+j+1 <= T - 1).
"""

import torch


def valid_anchor_range(num_prompt_tokens: int, num_tokens: int) -> tuple[int, int]:
    """[lo, hi) of anchor positions with at least one supervised draft position."""
    return num_prompt_tokens, max(num_prompt_tokens, num_tokens - 1)


def sample_anchors(num_prompt_tokens: list[int], num_tokens: list[int], num_anchors: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `num_anchors` distinct random anchors per sequence, sorted.

    Returns anchors [B, N] (long) and keep [B, N] (bool; False for padding where a sequence
    has fewer valid anchors; padded anchors point at the last valid position or the prompt's
    end and are masked out of every loss).
    """
    bsz = len(num_tokens)
    anchors = torch.zeros(bsz, num_anchors, dtype=torch.long)
    keep = torch.zeros(bsz, num_anchors, dtype=torch.bool)
    for b, (p, t) in enumerate(zip(num_prompt_tokens, num_tokens)):
        lo, hi = valid_anchor_range(p, t)
        n = min(num_anchors, hi - lo)
        if n > 0:
            chosen = (torch.randperm(hi - lo, generator=generator)[:n] + lo).sort().values
            anchors[b, :n] = chosen
            keep[b, :n] = True
        anchors[b, n:] = max(0, min(lo, t - 1))
    return anchors, keep


def block_labels(token_ids: torch.Tensor, num_tokens: torch.Tensor, anchors: torch.Tensor,
                 keep: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forcing inputs and supervision of every block.

    token_ids [B, S] (padded), num_tokens [B], anchors/keep [B, N] ->
    prev_ids [B, N, γ] (x_{k-1}: the anchor then the true tokens), label positions [B, N, γ]
    (the position whose target distribution position k must match: a + k, clamped), and
    mask [B, N, γ] (supervised: kept block and a + k + 1 <= T - 1).
    """
    offs = torch.arange(block)
    pos = anchors[..., None] + offs  # [B, N, γ]: position of x_{k-1}... i.e. a + k
    valid = (pos + 1 <= num_tokens[:, None, None] - 1) & keep[..., None]
    safe = pos.clamp(max=token_ids.shape[1] - 1)
    prev_ids = token_ids.gather(1, safe.view(token_ids.shape[0], -1)).view_as(pos)
    return prev_ids, safe, valid
