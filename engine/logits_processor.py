"""Per-request logits processing before temperature: logit bias and repetition penalties.

Speculative verification scores 1 + ℓ positions of a request in one forward. Position k must
see the distribution plain decoding would have used there, so its penalties count the
committed output plus the first k draft tokens: the draft tokens before it are, if that
position is ever sampled from, exactly the tokens plain decoding would have emitted.

Order and definitions follow vLLM (and OpenAI for the two additive penalties):
logits += bias; logits of every token seen in prompt or output are divided by the repetition
penalty when positive, multiplied when negative; then
logits -= frequency_penalty * count + presence_penalty * (count > 0) over the output tokens.
"""

from dataclasses import dataclass

import torch

from scheduler import SamplingParams


@dataclass(frozen=True, slots=True)
class RowContext:
    """What one request's rows depend on: its committed tokens and the drafts being verified."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    draft_ids: list[int]

    @property
    def num_rows(self) -> int:
        return len(self.draft_ids) + 1


def process_logits(logits: torch.Tensor, contexts: list[RowContext]) -> torch.Tensor:
    """[Σ rows, V] fp32 logits, request after request -> the processed logits (a new tensor
    when anything applies, else `logits` itself)."""
    if not any(c.params.processes_logits for c in contexts):
        return logits
    logits = logits.clone()
    base = 0
    for c in contexts:
        if c.params.processes_logits:
            _process_rows(logits[base:base + c.num_rows], c)
        base += c.num_rows
    return logits


def _process_rows(rows: torch.Tensor, c: RowContext) -> None:
    """In place on one request's rows [1 + ℓ, V]."""
    p, vocab, device = c.params, rows.shape[-1], rows.device
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), device=device)
        rows[:, ids] += torch.tensor(list(p.logit_bias.values()), device=device, dtype=rows.dtype)
    if not p.has_penalties:
        return
    counts = output_counts(c.output_ids, c.draft_ids, vocab, device)  # [1 + ℓ, V]
    if p.repetition_penalty != 1.0:
        seen = counts > 0
        if c.prompt_ids:
            seen |= torch.bincount(torch.tensor(c.prompt_ids, device=device), minlength=vocab)[None] > 0
        penalised = torch.where(rows > 0, rows / p.repetition_penalty, rows * p.repetition_penalty)
        rows.copy_(torch.where(seen, penalised, rows))
    if p.frequency_penalty:
        rows -= p.frequency_penalty * counts
    if p.presence_penalty:
        rows -= p.presence_penalty * (counts > 0).to(rows.dtype)


def output_counts(output_ids: list[int], draft_ids: list[int], vocab: int,
                  device: torch.device) -> torch.Tensor:
    """[1 + ℓ, V] float counts: row k counts the output tokens plus the first k drafts."""
    committed = torch.zeros(vocab, device=device)
    if output_ids:
        committed += torch.bincount(torch.tensor(output_ids, device=device), minlength=vocab)
    counts = committed.expand(len(draft_ids) + 1, vocab).clone()
    for k, token in enumerate(draft_ids):
        counts[k + 1:, token] += 1
    return counts
