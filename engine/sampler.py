"""Token sampling: temperature, top-k, top-p, per-request seeds.

Randomness of a seeded request depends only on (seed, output position), never on which other
requests share the batch or on preemption, so seeded outputs are reproducible.
"""

import torch

from scheduler import SamplingParams

_MASK64 = (1 << 63) - 1


def target_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution plain sampling draws from: [N, V] logits -> [N, V] probabilities.

    Greedy rows (temperature 0) become one-hot on the argmax.
    """
    logits = logits.float()
    temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params],
                         device=logits.device)
    logits = logits / temps[:, None]
    top_k = [p.top_k if p.top_k > 0 else 0 for p in params]
    top_p = [p.top_p for p in params]
    if any(top_k) or any(p < 1.0 for p in top_p):
        logits = _apply_top_k_top_p(logits, top_k, top_p)
    probs = logits.softmax(dim=-1)
    greedy = [i for i, p in enumerate(params) if p.temperature == 0]
    if greedy:
        rows = torch.tensor(greedy, device=logits.device)
        one_hot = torch.zeros_like(probs[rows])
        one_hot.scatter_(1, logits[rows].argmax(dim=-1, keepdim=True), 1.0)
        probs[rows] = one_hot
    return probs


def _apply_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.tensor([k if k > 0 else vocab for k in top_k], device=logits.device)
    ranks = torch.arange(vocab, device=logits.device)
    drop = ranks[None, :] >= k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    p = torch.tensor(top_p, device=logits.device, dtype=torch.float32)
    probs = sorted_logits.softmax(dim=-1)
    # keep the smallest prefix whose mass reaches p (the top token is always kept)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= p[:, None], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def exponential_noise(params: list[SamplingParams], positions: list[int], vocab: int,
                      device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """[N, V] Exp(1) noise; argmax(probs / noise) is a sample from probs (the exponential race).

    Rows of seeded requests draw from a generator keyed on (seed, output position).
    """
    noise = torch.empty(len(params), vocab, device=device)
    for i, (p, pos) in enumerate(zip(params, positions)):
        gen = generator
        if p.seed is not None:
            gen = torch.Generator(device=device)
            gen.manual_seed(hash((p.seed, pos)) & _MASK64)
        noise[i].exponential_(generator=gen)
    return noise


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               positions: list[int]) -> list[int]:
        """One token per row of `logits` [N, V]; `positions` are the rows' output indices."""
        if all(p.temperature == 0 for p in params):
            return logits.argmax(dim=-1).tolist()
        probs = target_probs(logits, params)
        noise = exponential_noise(params, positions, probs.shape[-1], self.device, self.generator)
        return (probs / noise).argmax(dim=-1).tolist()
