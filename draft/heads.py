"""DSpark's sequential heads and confidence head.

A sequential head turns the backbone's base logits U_k into logits_k = U_k + B_k, where the bias
B_k depends on the previous draft token x_{k-1} (x_0 = the anchor), so draft tokens are drawn left
to right while the backbone runs once. Both heads work in two modes that must agree exactly:
`teacher_forced` (training: all previous tokens known, one call) and `step` (inference: one
position at a time after sampling the previous token).

- `MarkovHead`: B_k = W2 · W1[x_{k-1}], low rank r (W1: V x r lookup, W2: r x V).
- `RNNHead`: a gated recurrent state s_k over [s_{k-1}; W1[x_{k-1}]; h_k] (GRU-style update),
  B_k = W2 · s_k with s_k in (-1, 1).
"""

import torch
import torch.nn.functional as F
from torch import nn

from engine.model import Linear


class SequentialHead(nn.Module):
    """Shared interface; `prev_embed` is W1 (the confidence head reads it too)."""

    def __init__(self, vocab_size: int, rank: int) -> None:
        super().__init__()
        self.rank = rank
        self.prev_embed = nn.Embedding(vocab_size, rank)  # W1
        self.out = Linear(rank, vocab_size, bias=False)  # W2
        nn.init.normal_(self.prev_embed.weight, std=0.02)
        nn.init.zeros_(self.out.weight)  # starts as the plain parallel drafter

    def init_state(self, batch: int, hidden: torch.Tensor) -> torch.Tensor | None:
        return None

    def step(self, state: torch.Tensor | None, prev_ids: torch.Tensor, h: torch.Tensor,
             out: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """prev_ids [N], h [N, hidden] -> (bias [N, vocab], next state). `out` replaces W2,
        e.g. by its rows of a draft vocabulary (then bias is [N, len(rows)])."""
        raise NotImplementedError

    def output_rows(self, rows: torch.Tensor | None):
        """W2, or a trainable function computing only its `rows` (a draft vocabulary)."""
        if rows is None:
            return self.out
        weight = self.out.weight.index_select(0, rows)
        return lambda x: F.linear(x, weight)

    def teacher_forced(self, prev_ids: torch.Tensor, h: torch.Tensor,
                       rows: torch.Tensor | None = None) -> torch.Tensor:
        """prev_ids [N, γ] (anchor then the true tokens), h [N, γ, hidden] -> bias [N, γ, vocab]
        (or [N, γ, len(rows)])."""
        out = self.output_rows(rows)
        state = self.init_state(prev_ids.shape[0], h)
        biases = []
        for k in range(prev_ids.shape[1]):
            bias, state = self.step(state, prev_ids[:, k], h[:, k], out)
            biases.append(bias)
        return torch.stack(biases, dim=1)


class MarkovHead(SequentialHead):
    kind = "markov"

    def step(self, state, prev_ids, h, out=None):
        return (out if out is not None else self.out)(self.prev_embed(prev_ids)), None

    def teacher_forced(self, prev_ids, h, rows=None):
        return self.output_rows(rows)(self.prev_embed(prev_ids))  # position-wise: no recurrence


class RNNHead(SequentialHead):
    kind = "rnn"

    def __init__(self, vocab_size: int, rank: int, hidden_size: int) -> None:
        super().__init__(vocab_size, rank)
        self.gates = Linear(2 * rank + hidden_size, 2 * rank)
        nn.init.normal_(self.gates.weight, std=0.02)
        nn.init.zeros_(self.gates.bias)

    def init_state(self, batch, hidden):
        return hidden.new_zeros(batch, self.rank)

    def step(self, state, prev_ids, h, out=None):
        x = torch.cat([state, self.prev_embed(prev_ids).to(h.dtype), h], dim=-1)
        update, candidate = self.gates(x).chunk(2, dim=-1)
        z = torch.sigmoid(update)
        state = (1 - z) * state + z * torch.tanh(candidate)
        return (out if out is not None else self.out)(state), state


def make_head(kind: str, vocab_size: int, rank: int, hidden_size: int) -> SequentialHead | None:
    if kind == "none":
        return None
    if kind == "markov":
        return MarkovHead(vocab_size, rank)
    if kind == "rnn":
        return RNNHead(vocab_size, rank, hidden_size)
    raise ValueError(f"unknown sequential head {kind!r}; choose markov, rnn or none")


class ConfidenceHead(nn.Module):
    """c_k = sigmoid(wᵀ [h_k ; W1[x_{k-1}]] + b) / T_k: P(x_k accepted | earlier ones accepted).

    Returns logits; at inference `calibrated` maps them with the per-position STS terms."""

    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.proj = Linear(input_dim, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features).squeeze(-1).float()


def calibration_terms(temperatures: tuple[float, ...] | None, biases: tuple[float, ...] | None,
                      block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """STS temperatures T_k and biases b_k for positions 1..block ([block] each); positions past
    the fitted ones reuse the last fitted terms (none fitted: T = 1, b = 0)."""
    def pad(values: tuple[float, ...] | None, default: float) -> torch.Tensor:
        v = list(values or [])
        v = (v + [v[-1] if v else default] * block)[:block]
        return torch.tensor(v, device=device, dtype=torch.float32)
    return pad(temperatures, 1.0), pad(biases, 0.0)


def calibrated(logits: torch.Tensor, temperature: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """c = sigmoid(z / T + b): monotone in z for T > 0, so a position's ranking is kept."""
    return torch.sigmoid(logits / temperature + bias)
