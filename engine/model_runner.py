"""Runs one `SchedulerOutput` as one flat forward and samples the requested tokens."""

import logging

import torch

from engine.attention import AttentionBackend
from engine.flat_batch import FlatBatch
from engine.kv_cache import PagedKVCache
from engine.model import AttentionContext, CausalLM
from engine.sampler import Sampler
from scheduler import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: CausalLM, kv_cache: PagedKVCache, backend: AttentionBackend,
                 sampler: Sampler, device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.sampler = sampler
        self.device = device

    @torch.inference_mode()
    def execute(self, sched_out: SchedulerOutput) -> ModelRunnerOutput:
        req_ids = [s.req_id for s in sched_out.scheduled]
        sampled: list[list[int]] = [[] for _ in req_ids]
        if not req_ids:
            return ModelRunnerOutput(req_ids, sampled)
        batch, hidden = self._forward(sched_out)
        if batch.sampled_req_indices:
            logits = self.model.compute_logits(hidden.index_select(0, batch.logits_indices))  # [N, vocab]
            reqs = [sched_out.scheduled[r] for r in batch.sampled_req_indices]
            tokens = self.sampler.sample(logits, [s.params for s in reqs],
                                         [s.num_output_tokens for s in reqs])
            for r, token in zip(batch.sampled_req_indices, tokens):
                sampled[r] = [token]
        return ModelRunnerOutput(req_ids, sampled)

    @torch.inference_mode()
    def all_logits(self, sched_out: SchedulerOutput) -> torch.Tensor:
        """Logits of every token of the step, [T, vocab] (for tests and debugging)."""
        return self.model.compute_logits(self._forward(sched_out)[1])

    def _forward(self, sched_out: SchedulerOutput) -> tuple[FlatBatch, torch.Tensor]:
        batch = FlatBatch.build(sched_out, self.kv_cache.block_size, self.device)
        ctx = AttentionContext(self.backend, self.backend.prepare(batch), self.kv_cache)
        hidden, _ = self.model(batch.input_ids, batch.positions, ctx)
        return batch, hidden
