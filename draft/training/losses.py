"""DSpark's training loss: 0.1 CE + 0.9 TV + 1.0 confidence BCE, position-decay weighted.

For draft position k (0-based) of a block, with draft distribution p_d,k and the target's p_t,k:
- CE against the target's sampled next token,
- TV term ‖p_d,k − p_t,k‖₁ (the paper's L1 form, in [0, 2]),
- optionally forward KL(p_t ‖ p_d) (as the soft cross-entropy −Σ p_t log p_d; a warm start
  whose gradient reaches every token, where TV's only pushes the mismatched ones),
- BCE of the confidence logit against the soft label c*_k = 1 − ½‖p_d,k − p_t,k‖₁ (the exact
  probability that x_k ~ p_d is accepted by rejection sampling against p_t; detached),
each weighted by w_k = exp(−k/γ') and averaged over supervised positions.

A drafter with a draft vocabulary V' has logits over V' only. The target's probabilities are
then its full-vocabulary ones restricted to V' (not renormalised): the mass 1 − p_t(V') it puts
outside is a constant part of ‖p_d − p_t‖₁, and Σ min(p_d, p_t) stays the exact acceptance.
Labels outside V' (index −1) drop out of the CE term.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class LossWeights:
    ce: float = 0.1
    tv: float = 0.9
    confidence: float = 1.0
    decay: float = 4.0  # γ' of exp(-k/γ'); <= 0 disables the decay
    kl: float = 0.0


def decay_weights(block: int, decay: float, device: torch.device | None = None) -> torch.Tensor:
    """[γ] weights exp(-k/γ') for k = 0..γ-1 (all ones when decay <= 0)."""
    k = torch.arange(block, dtype=torch.float32, device=device)
    return torch.exp(-k / decay) if decay > 0 else torch.ones_like(k)


def tv_distance(draft_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """‖softmax(d) − p_t‖₁ per row over the full vocabulary, where `target_probs` may cover only
    the drafter's columns (summing to p_t(V') <= 1): [..., V'] x [..., V'] -> [...]."""
    return _tv_of_probs(draft_logits.float().softmax(-1), target_probs)


def _tv_of_probs(draft_probs: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    p_t = target_probs.float()
    outside = (1.0 - p_t.sum(-1)).clamp(min=0.0)
    return (draft_probs - p_t).abs().sum(-1) + outside


def acceptance_labels(tv: torch.Tensor) -> torch.Tensor:
    """Soft confidence label c* = 1 − ½‖p_d − p_t‖₁, in [0, 1]."""
    return (1.0 - 0.5 * tv).clamp(0.0, 1.0)


def drafter_loss(draft_logits: torch.Tensor, target_probs: torch.Tensor, labels: torch.Tensor,
                 mask: torch.Tensor, confidence_logits: torch.Tensor | None,
                 weights: LossWeights = LossWeights()) -> tuple[torch.Tensor, dict[str, float]]:
    """draft logits and target probabilities [..., γ, V'], labels (column index, −1 outside V')
    and mask [..., γ], confidence logits [..., γ] -> (loss, metrics: ce, tv, kl, bce, acceptance
    per token, mean confidence)."""
    block = draft_logits.shape[-2]
    w = decay_weights(block, weights.decay, draft_logits.device) * mask.float()  # [..., γ]
    den = w.sum().clamp(min=1e-6)
    log_p = draft_logits.float().log_softmax(-1)
    known = labels >= 0
    w_ce = w * known.float()
    ce = -log_p.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    ce = (ce * w_ce).sum() / w_ce.sum().clamp(min=1e-6)
    tv = _tv_of_probs(log_p.exp(), target_probs)  # the softmax once, shared with the CE
    loss_tv = (tv * w).sum() / den
    loss = weights.ce * ce + weights.tv * loss_tv
    metrics = {"ce": float(ce.detach()), "tv": float(loss_tv.detach())}
    if weights.kl > 0:
        kl = -(target_probs.float() * log_p).sum(-1)  # KL(p_t || p_d) up to a constant
        kl = (kl * w).sum() / den
        loss = loss + weights.kl * kl
        metrics["kl"] = float(kl.detach())
    accept = acceptance_labels(tv.detach())
    m = mask.float()
    metrics["accept"] = float((accept * m).sum() / m.sum().clamp(min=1))
    if confidence_logits is not None and weights.confidence > 0:
        bce = F.binary_cross_entropy_with_logits(confidence_logits.float(), accept, reduction="none")
        bce = (bce * w).sum() / den
        loss = loss + weights.confidence * bce
        metrics["bce"] = float(bce.detach())
        metrics["conf"] = float((confidence_logits.detach().sigmoid() * m).sum() / m.sum().clamp(min=1))
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def expected_accept_length(accept: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over blocks of 1 + Σ_k Π_{i<=k} α_i (α: per-position acceptance probabilities of
    fully supervised blocks): the τ the drafter would reach with the target's own data."""
    full = mask.all(-1)
    if not full.any():
        return float("nan")
    return float((1 + accept[full].cumprod(-1).sum(-1)).mean())
