"""Runs one `SchedulerOutput` as one flat forward and samples the requested tokens."""

import logging
import time

import torch

from draft import Drafter, DraftInput
from engine.attention import AttentionBackend
from engine.flat_batch import FlatBatch
from engine.grammar import GrammarMasks, MaskedRequest
from engine.kv_cache import PagedKVCache
from engine.logits_processor import RowContext
from engine.model import AttentionContext, CausalLM
from engine.sampler import Sampler
from scheduler import ModelRunnerOutput, ScheduledRequest, SchedulerOutput, TokenLogprob

logger = logging.getLogger(__name__)


def _row_context(s: ScheduledRequest, drafts: list[int]) -> RowContext:
    """Bias and penalties need the committed tokens only; skip the copies otherwise."""
    if not s.params.processes_logits:
        return RowContext(s.params, [], [], drafts)
    assert s.history is not None, "the scheduler hands every sampled request its history"
    split = len(s.history) - s.num_output_tokens
    return RowContext(s.params, s.history[:split], s.history[split:], drafts)


def _guard_non_finite(logits: torch.Tensor, drafts: list[list[int]]) -> tuple[torch.Tensor, set[int]]:
    """Logits safe to sample from, and which requests (indices into `drafts`, whose rows are
    1 + len(draft) each, in order) had a NaN or inf in any of their rows: those must never
    turn into tokens. A row's sum is non-finite iff one of its values is, and costs one
    reduction (~1 ms at 256 rows on 2 CPU cores; a full isfinite() pass costs 40x more)."""
    finite = logits.sum(-1).isfinite()
    if bool(finite.all()):  # a host sync; the sampler reads tokens back right after anyway
        return logits, set()
    broken, row = set(), 0
    for i, draft in enumerate(drafts):
        if not bool(finite[row:row + len(draft) + 1].all()):
            broken.add(i)
        row += len(draft) + 1
    return logits.masked_fill(~finite[:, None], 0.0), broken


class ModelRunner:
    def __init__(self, model: CausalLM, kv_cache: PagedKVCache, backend: AttentionBackend,
                 sampler: Sampler, device: torch.device, drafter: Drafter | None = None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.sampler = sampler
        self.device = device
        self.drafter = drafter
        # Draft distributions of the latest proposal per request (physical state: the
        # scheduler sees only token ids and confidences).
        self._draft_probs: dict[str, torch.Tensor | None] = {}
        # structured outputs' matchers; set by the engine with the first constrained request
        self.grammar: GrammarMasks | None = None
        self.drafting_failed = False  # the drafter raised once and was dropped

    @torch.inference_mode()
    def execute(self, sched_out: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in sched_out.finished_req_ids:
            self._forget(req_id)
        req_ids = [s.req_id for s in sched_out.scheduled]
        sampled: list[list[int]] = [[] for _ in req_ids]
        logprobs: list[list[TokenLogprob] | None] = [None for _ in req_ids]
        failed: set[int] = set()
        if not req_ids:
            return ModelRunnerOutput(req_ids, sampled)
        t0 = time.perf_counter()
        layers = self.drafter.target_layers if self.drafter is not None else ()
        batch, hidden, captured = self._forward(sched_out, layers)
        if batch.sampled_req_indices:
            logits = self.model.compute_logits(hidden.index_select(0, batch.logits_indices))  # [N, vocab]
            reqs = [sched_out.scheduled[r] for r in batch.sampled_req_indices]
            drafts = [s.token_ids[len(s.token_ids) - s.num_draft_tokens:] for s in reqs]
            draft_probs = [self._draft_probs_for(s) for s in reqs]
            contexts = [_row_context(s, d) for s, d in zip(reqs, drafts)]
            # On CUDA the forward and logits above are only queued, so the masks (host work)
            # overlap them; on CPU a mask thread beside torch's own threads measured slower than
            # this serial call (32 rows: 2 ms alone, GIL and cores contended)
            allowed = self._grammar_masks(reqs, drafts, logits.shape[0])
            logits, broken = _guard_non_finite(logits, drafts)
            verified = self.sampler.verify(logits, [s.params for s in reqs],
                                           [s.num_output_tokens for s in reqs], drafts, draft_probs, contexts,
                                           allowed)
            for i, (s, new, lp) in enumerate(zip(reqs, verified.token_ids, verified.logprobs)):
                r = batch.sampled_req_indices[i]
                if i in broken:
                    logger.error("request %s: the model's logits were not finite (NaN or inf); "
                                 "stopping it", s.req_id)
                    failed.add(r)
                    continue
                if allowed is not None and s.params.structured is not None:
                    assert self.grammar is not None
                    self.grammar.commit(s.req_id, new)
                sampled[r] = new
                logprobs[r] = lp
        out = ModelRunnerOutput(req_ids, sampled, logprobs, self._prompt_logprobs(sched_out, batch, hidden),
                                failed=frozenset(failed))
        t1 = time.perf_counter()  # sampling synchronised with the device (it reads tokens back)
        out.forward_seconds = t1 - t0
        if self.drafter is not None:
            features = torch.cat([captured[i] for i in layers], dim=-1) if layers else None
            try:
                self._propose(sched_out, batch, out, features)
            except Exception:  # noqa: BLE001 - any drafter bug: drafts are optional, outputs are not
                self._disable_drafting(out)
                return out
            out.draft_seconds = time.perf_counter() - t1
            passed = self.drafter.last_pass_seconds
            out.draft_pass_seconds = out.draft_seconds if passed is None else passed
        return out

    def _disable_drafting(self, out: ModelRunnerOutput) -> None:
        """A drafter that raised is dropped: every request goes on with plain decoding, which
        samples the target's own distribution, so outputs stay exact; only speed is lost."""
        logger.exception("the drafter %r failed; speculation is off for the rest of this process "
                         "(outputs are unaffected)", self.drafter.name if self.drafter else None)
        self.drafter = None
        self.drafting_failed = True
        self._draft_probs.clear()
        # empty proposals (not None) so the scheduler drops the drafts requests still hold
        out.draft_token_ids = [[] for _ in out.req_ids]
        out.draft_confidences = [None for _ in out.req_ids]
        out.draft_sources = ["" for _ in out.req_ids]

    def _grammar_masks(self, reqs: list[ScheduledRequest], drafts: list[list[int]], num_rows: int
                       ) -> torch.Tensor | None:
        """Allowed tokens per logits row when a sampled request has a structured output."""
        constrained: list[MaskedRequest] = []
        row = 0
        for s, d in zip(reqs, drafts):
            if s.params.structured is not None:
                constrained.append(MaskedRequest(s.req_id, s.params.structured, row, d))
            row += len(d) + 1
        if not constrained:
            return None
        assert self.grammar is not None, "the engine sets the grammar up when it admits such a request"
        return self.grammar.masks(constrained, num_rows)

    def _prompt_logprobs(self, sched_out: SchedulerOutput, batch: FlatBatch, hidden: torch.Tensor
                         ) -> list[tuple[int, list[TokenLogprob]] | None] | None:
        """Raw log-probabilities of the prompt tokens each prefill chunk predicts: the logits at
        prompt position p score prompt token p + 1 (the last position's sample the output)."""
        wanted = [s.params.prompt_logprobs is not None and s.num_output_tokens == 0 for s in sched_out.scheduled]
        if not any(wanted):
            return None
        starts = batch.cu_seqlens_q.tolist()
        out: list[tuple[int, list[TokenLogprob]] | None] = []
        for r, (s, want) in enumerate(zip(sched_out.scheduled, wanted)):
            assert s.history is not None
            end = min(s.start_pos + s.num_tokens, len(s.history) - 1)  # prompt tokens with a successor
            if not want or end <= s.start_pos:
                out.append(None)
                continue
            rows = hidden[starts[r]:starts[r] + end - s.start_pos]
            logp = self.model.compute_logits(rows).float().log_softmax(-1)
            targets = torch.tensor(s.history[s.start_pos + 1:end + 1], device=logp.device)
            chosen = logp.gather(1, targets[:, None])[:, 0].tolist()
            k = s.params.prompt_logprobs
            tops: list[tuple[tuple[int, float], ...]] = [()] * len(chosen)
            if k:
                values, ids = logp.topk(k, dim=-1)
                tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
            out.append((s.start_pos + 1, [TokenLogprob(t, lp, top)
                                          for t, lp, top in zip(targets.tolist(), chosen, tops)]))
        return out

    def _draft_probs_for(self, s) -> torch.Tensor | None:
        probs = self._draft_probs.get(s.req_id) if s.num_draft_tokens else None
        return None if probs is None else probs[:s.num_draft_tokens]

    def _propose(self, sched_out: SchedulerOutput, batch: FlatBatch, out: ModelRunnerOutput,
                 features: torch.Tensor | None) -> None:
        """Tell the drafter what every request committed; draft for those that sampled.

        `features` [num_tokens, F] holds the captured target layers of every token of the
        step; a request's committed ones are its first tokens up to the last accepted draft.
        """
        inputs: list[DraftInput] = []
        starts = batch.cu_seqlens_q.tolist()
        for r, (s, new) in enumerate(zip(sched_out.scheduled, out.sampled_token_ids)):
            assert s.history is not None
            num_accepted = len(new) - 1 if new else 0
            num_committed = s.num_tokens - s.num_draft_tokens + num_accepted  # now in the KV
            ctx = None if features is None or not s.draft_context else features[starts[r]:starts[r] + num_committed]
            # a prediction drafts even while the verify policy rests the drafter: it costs nothing
            positions = s.max_draft_positions
            room = positions != 0 or s.params.prediction is not None
            # the drafter pages its context in the request's blocks, so choices forked from
            # this prompt and later prefix-cache hits find it there
            inputs.append(DraftInput(s.req_id, s.history + new, s.start_pos + num_committed, ctx,
                                     wants_proposal=bool(new) and room and s.params.speculative,
                                     temperature=s.params.temperature, max_draft_tokens=positions,
                                     seed=s.params.seed, num_output_tokens=s.num_output_tokens + len(new),
                                     prediction=s.params.prediction, block_table=s.block_table))
        out.draft_token_ids = [[] for _ in out.req_ids]
        out.draft_confidences = [None for _ in out.req_ids]
        out.draft_sources = ["" for _ in out.req_ids]
        for r, proposal in enumerate(self.drafter.propose(inputs)):
            out.draft_token_ids[r] = proposal.draft_token_ids
            out.draft_confidences[r] = proposal.confidences
            out.draft_sources[r] = proposal.source or self.drafter.name
            self._draft_probs[out.req_ids[r]] = proposal.draft_probs

    def _forget(self, req_id: str) -> None:
        self._draft_probs.pop(req_id, None)
        if self.grammar is not None:
            self.grammar.free(req_id)
        if self.drafter is not None:
            self.drafter.free(req_id)

    @torch.inference_mode()
    def all_logits(self, sched_out: SchedulerOutput) -> torch.Tensor:
        """Logits of every token of the step, [T, vocab] (for tests and debugging)."""
        return self.model.compute_logits(self._forward(sched_out)[1])

    def _forward(self, sched_out: SchedulerOutput, capture_layers: tuple[int, ...] = ()
                 ) -> tuple[FlatBatch, torch.Tensor, dict[int, torch.Tensor]]:
        batch = FlatBatch.build(sched_out, self.kv_cache.block_size, self.device)
        ctx = AttentionContext(self.backend, self.backend.prepare(batch), self.kv_cache)
        hidden, captured = self.model(batch.input_ids, batch.positions, ctx, capture_layers)
        return batch, hidden, captured
