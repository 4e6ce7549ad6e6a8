"""The drafter interface: given the requests of a step, propose draft tokens for each."""

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import torch
from torch import nn

from draft.context import PagedContext


@dataclass(slots=True)
class TargetHandle:
    """The parts of the target model a learned drafter shares (frozen): token embedding,
    final norm and LM head, plus the facts needed to size it and place it."""

    embed_tokens: nn.Embedding
    final_norm: nn.Module
    lm_head: nn.Module  # [N, hidden] -> [N, vocab]
    hidden_size: int
    vocab_size: int
    num_layers: int
    device: torch.device
    dtype: torch.dtype


@dataclass(slots=True)
class DraftInput:
    """What a drafter sees of one request after a step.

    `token_ids`: the committed tokens (prompt and output, this step's new ones included).
    `num_computed_tokens`: how many of them the target's KV now holds; the last committed
    token (the anchor of the next draft) is not among them when `wants_proposal`.
    `context_features` [m, len(target_layers) * hidden]: target hidden states of the chosen
    layers at positions num_computed_tokens - m .. num_computed_tokens - 1, i.e. the tokens
    this step committed to the KV (None for drafters without `target_layers`). Features of
    later positions that a drafter holds from earlier steps are stale (rejected) and dropped.
    `wants_proposal`: False for a prefill chunk that sampled nothing, or when the verify plan
    has no room for drafts this step (only context grows).
    `max_draft_tokens`: propose at most this many (None: the drafter's γ); the plan cannot
    verify more, so positions past it are not worth their LM-head rows.
    `temperature`: the request's sampling temperature (None: unknown; 0: greedy), so a
    drafter can match the target's sharpness or take the argmax.
    `seed`, `num_output_tokens`: a seeded request's output token k + 1 after these is the
    winner of the race `engine.sampler.seeded_race(seed, num_output_tokens + k)`; a sampling
    drafter draws draft k with the same race, or its drafts are rarely accepted.
    `prediction`: token ids of the text the request expects back (Predicted Outputs), a
    draft source of its own (draft/prediction.py).
    `block_table`: the request's KV blocks, where a learned drafter pages its own context
    (draft/context.py); positions before the first features it ever sees for a request (a
    prefix-cache hit, a forked prompt) already hold it.
    """

    req_id: str
    token_ids: list[int]
    num_computed_tokens: int
    context_features: torch.Tensor | None = None
    wants_proposal: bool = True
    temperature: float | None = None
    max_draft_tokens: int | None = None
    seed: int | None = None
    num_output_tokens: int = 0
    prediction: list[int] | None = None
    block_table: list[int] | None = None


@dataclass(slots=True)
class Proposal:
    """Up to γ draft tokens for one request.

    `draft_probs` [len, vocab] are the distributions the tokens were drawn from (None for a
    deterministic drafter: one-hot on each token). `confidences` estimate, per position, the
    probability that the token is accepted given all earlier ones were. `source`: what
    proposed it, for per-source acceptance metrics ("": the drafter that returned it).
    """

    draft_token_ids: list[int]
    draft_probs: torch.Tensor | None = None
    confidences: list[float] | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.draft_token_ids)


EMPTY_PROPOSAL = Proposal([])


class Drafter(ABC):
    """Drafters may keep per-request state; the engine tells them what ended."""

    name: str
    num_draft_tokens: int
    # Target layers whose outputs (hidden states) the drafter reads as context features.
    target_layers: tuple[int, ...] = ()
    # Whether proposals carry per-position confidences (then verification is scheduled).
    gives_confidences: bool = False
    # Wall time of the last drafting pass itself, without context bookkeeping (None: not
    # measured; the engine then charges the whole `propose`).
    last_pass_seconds: float | None = None

    @abstractmethod
    def propose(self, inputs: list[DraftInput]) -> list[Proposal]:
        """One proposal per input, in order (empty where `wants_proposal` is False)."""

    def free(self, req_id: str) -> None:
        """Forget a finished or preempted request."""

    def context_bytes_per_token(self) -> int:
        """Bytes of paged context per position (the engine sizes the KV pool with them)."""
        return 0

    def bind_context(self, num_blocks: int, block_size: int) -> None:
        """Allocate the paged context for the engine's KV blocks (drafters with context)."""

    def num_positions(self, inputs: list[DraftInput]) -> int:
        """Draft positions a batched proposal needs: γ, or less when every input asks less."""
        asked = [x.max_draft_tokens for x in inputs]
        if any(n is None for n in asked):
            return self.num_draft_tokens
        return min(self.num_draft_tokens, max(asked, default=0))


@dataclass(slots=True)
class _HeldContext:
    """Context features a resting drafter has received but not yet turned into K/V:
    rows for positions start .. start + len - 1."""

    start: int
    rows: list[torch.Tensor]

    @property
    def end(self) -> int:
        return self.start + sum(r.shape[0] for r in self.rows)

    def truncate(self, end: int) -> None:
        """Drop rows at positions >= end (stale: later features replace them)."""
        kept, pos = [], self.start
        for r in self.rows:
            if pos >= end:
                break
            kept.append(r[:end - pos])
            pos += r.shape[0]
        self.rows = kept


class LearnedDrafter(Drafter):
    """A drafter backed by a trained model that reads target features: context paged in the
    target's KV blocks (`PagedContext`, `context_width` values per position) and a seeded
    generator for draft sampling.

    Context is extended lazily: a request that does not draft this step holds on to its new
    features and turns them into context only once they fill a KV block (or when it drafts).
    Every full block of committed tokens therefore holds its context by the end of the step
    that filled it, which is when the scheduler offers it to the prefix cache; while the
    scheduler rests the drafter, a step costs plain decoding plus one context pass per 16
    tokens of each request that keeps context (block size 16; the scheduler sends no features
    for requests admitted beyond the probes' pool: `Request.draft_context`)."""

    def __init__(self, model: nn.Module, name: str, num_draft_tokens: int,
                 target_layers: tuple[int, ...], device: torch.device, seed: int = 0) -> None:
        self.model = model.eval()
        self.name = name
        self.gives_confidences = getattr(model, "confidence", None) is not None
        self.num_draft_tokens = num_draft_tokens
        self.target_layers = tuple(target_layers)
        self.held: dict[str, _HeldContext] = {}
        self.context: PagedContext | None = None
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @property
    @abstractmethod
    def context_width(self) -> int:
        """Values per position of the paged context."""

    @property
    def context_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def context_bytes_per_token(self) -> int:
        return PagedContext.bytes_per_token(self.context_width, self.context_dtype)

    def bind_context(self, num_blocks: int, block_size: int) -> None:
        self.context = PagedContext(num_blocks, block_size, self.context_width, self.context_dtype,
                                    next(self.model.parameters()).device)

    def free(self, req_id: str) -> None:
        self.held.pop(req_id, None)

    @torch.inference_mode()
    def propose(self, inputs: list[DraftInput]) -> list[Proposal]:
        assert self.context is not None, "bind_context first (the engine does)"
        drafting = [i for i, x in enumerate(inputs) if x.wants_proposal and self.num_draft_tokens > 0]
        wants = set(drafting)
        taken = [self._take_context(x, i in wants) for i, x in enumerate(inputs)]
        extend = [x for x in taken if x is not None]
        if extend:
            self._extend_context(extend)
        out = [EMPTY_PROPOSAL] * len(inputs)
        self.last_pass_seconds = None
        if drafting:
            start = time.perf_counter()
            for i, p in zip(drafting, self._draft([inputs[i] for i in drafting])):
                out[i] = p
            self.last_pass_seconds = time.perf_counter() - start
        return out

    def _take_context(self, x: DraftInput, drafting: bool) -> DraftInput | None:
        """Merge this step's features into what the request holds; return an input carrying
        the held features to turn into context now (for `_extend_context`): all of them when
        it drafts, else those of its full blocks."""
        assert x.block_table is not None, "a learned drafter pages its context in the request's blocks"
        f = x.context_features
        held = self.held.get(x.req_id)
        if f is not None and f.shape[0]:
            start = x.num_computed_tokens - f.shape[0]
            if held is None or start < held.start:
                held = self.held[x.req_id] = _HeldContext(start, [])
            assert start <= held.end, "context features skipped positions"
            held.truncate(start)
            held.rows.append(f if drafting else f.clone())  # a view would pin the step's tensor
        if held is None:
            return None
        assert held.end == x.num_computed_tokens, "held context does not reach the computed tokens"
        assert self.context is not None
        end = held.end if drafting else held.end // self.context.block_size * self.context.block_size
        if end <= held.start:
            return None
        rows = torch.cat(held.rows)
        cut = end - held.start
        if cut < rows.shape[0]:
            self.held[x.req_id] = _HeldContext(end, [rows[cut:]])
        else:
            del self.held[x.req_id]
        return replace(x, context_features=rows[:cut], num_computed_tokens=end)

    @abstractmethod
    def _extend_context(self, inputs: list[DraftInput]) -> None:
        """Write the context of the features each input carries (positions
        num_computed_tokens - m .. num_computed_tokens - 1) into `self.context`."""

    @abstractmethod
    def _draft(self, inputs: list[DraftInput]) -> list[Proposal]:
        """Propose for inputs whose context now covers all num_computed_tokens positions."""
