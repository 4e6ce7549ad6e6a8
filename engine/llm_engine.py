"""The step loop: schedule -> run one flat forward -> commit tokens -> detokenise."""

import itertools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch

from draft import Drafter, TargetHandle, make_drafter
from draft.prediction import PredictionDrafter
from engine.attention import FlashAttention, make_backend
from engine.batch_invariance import make_batch_invariant
from engine.config import EngineConfig
from engine.grammar import GrammarCompiler, GrammarMasks
from engine.host_memory import tune_host_malloc
from engine.kv_cache import PagedKVCache
from engine.loader import build_model, load_checkpoint
from engine.model_runner import ModelRunner
from engine.output_processor import OutputProcessor, RequestOutput
from engine.sampler import Sampler
from engine.sps_profiler import load_or_profile, profile_key
from engine.tensor_parallel import TensorParallelLM, check_size, local_arch, start_workers
from scheduler import (
    BlockManager,
    CapacityExceeded,
    InvalidRequest,
    ModelRunnerOutput,
    Request,
    RequestStatus,
    RequestUpdate,
    SamplingParams,
    ScheduledRequest,
    Scheduler,
    SchedulerOutput,
)
from scheduler.block_manager import cdiv

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StepStats:
    """What one engine step did, for metrics and logs."""

    num_running: int
    num_waiting: int
    num_scheduled_tokens: int
    kv_usage: float
    # ℓ_r of each request that verified drafts this step (the verify budget per request)
    verify_lengths: list[int] = field(default_factory=list)
    num_drafted: int = 0  # draft tokens proposed for the next step
    num_verify_tokens: int = 0  # K: draft tokens admitted
    expected_accepted: float = 0.0
    num_accepted: int = 0  # realised
    # per draft source (drafter name, "prediction"): draft tokens verified / accepted
    verified_by_source: dict[str, int] = field(default_factory=dict)
    accepted_by_source: dict[str, int] = field(default_factory=dict)
    forward_seconds: float = 0.0
    draft_seconds: float = 0.0


class LLMEngine:
    def __init__(self, config: EngineConfig, drafter: Drafter | None = None) -> None:
        """`drafter` overrides `config.speculative.draft` with a ready instance (tests, custom)."""
        self.config = config
        self.device = torch.device(config.device)
        tp = config.tensor_parallel_size
        if self.device.type == "cpu":
            # the ranks of a tensor-parallel engine share the cores
            torch.set_num_threads(config.num_threads or max(1, (os.cpu_count() or 1) // tp))
            tune_host_malloc()
        dtype = config.torch_dtype
        t0 = time.perf_counter()
        ckpt = load_checkpoint(config.model)
        self.model_name = ckpt.name
        self.arch = ckpt.arch
        self.tokenizer = ckpt.tokenizer
        quantization = config.quantization
        if config.tp_invariant and not config.deterministic:
            raise InvalidRequest("--tp-invariant extends --deterministic: give both", "tp_invariant")
        if config.deterministic:
            if quantization == "int4":
                raise InvalidRequest("--deterministic runs one weight format (bf16 or the dtype): "
                                     "use --quantization none", "deterministic")
            quantization = "none"  # int4 for small steps and dense for large ones would differ
        if tp > 1:
            check_size(ckpt.arch, tp)
            if config.quantization == "int4":
                raise InvalidRequest("int4 weights do not run tensor parallel: use --quantization none",
                                     "quantization")
            local = build_model(ckpt, self.device, dtype, "none", tp=(0, tp), fixed_order=config.tp_invariant)
            self.model = TensorParallelLM(local, tp)
        else:
            local = self.model = build_model(ckpt, self.device, dtype, quantization,
                                             fixed_order=config.tp_invariant)
        self.kv_arch = local_arch(ckpt.arch, 0, tp)  # the heads this process caches
        min_query_rows = None
        if config.deterministic:
            bounds, min_query_rows = make_batch_invariant(local, self.kv_arch, dtype, self.device)
            logger.info("deterministic: projections run in calls of %d to %d rows, attention in calls of "
                        "at least %d query rows%s", bounds.min_rows, bounds.max_rows, min_query_rows,
                        ", row-parallel sums in a fixed order" if config.tp_invariant else "")

        self.backend = make_backend(config.attention_backend, self.device, min_query_rows)
        block_size = config.cache.block_size
        if isinstance(self.backend, FlashAttention):
            block_size = max(block_size, FlashAttention.block_size_multiple)
        spec = config.speculative
        if drafter is None and spec.draft:
            drafter = make_drafter(spec.draft, spec.num_draft_tokens, self._target_handle())
        # a learned drafter pages its context in the same blocks: one budget covers both
        drafter_bytes = drafter.context_bytes_per_token() * block_size if drafter is not None else 0
        num_blocks = config.cache.num_blocks or self._num_blocks_from_memory(block_size, dtype, drafter_bytes)
        self.kv_cache = PagedKVCache(self.kv_arch, num_blocks, block_size, dtype, self.device)
        if isinstance(self.model, TensorParallelLM):
            self.model.workers = start_workers(config, num_blocks, block_size)
        if drafter is not None:
            drafter.bind_context(num_blocks, block_size)
        capacity = num_blocks * block_size
        self.max_model_len = min(config.max_model_len or ckpt.arch.max_position_embeddings,
                                 ckpt.arch.max_position_embeddings, capacity)
        self.block_manager = BlockManager(num_blocks, block_size, config.cache.enable_prefix_caching)
        self.runner = ModelRunner(self.model, self.kv_cache, self.backend,
                                  Sampler(self.device, config.seed), self.device, drafter)
        sched_config = config.scheduler
        if sched_config.verify_policy == "auto":
            # confidence scheduling where the drafter gives confidences, else verify all drafts
            policy = "scheduled" if drafter is not None and drafter.gives_confidences else "fixed"
            sched_config = replace(sched_config, verify_policy=policy)
        self.sps = None
        # the SPS profile's cache key: what changes step times
        self.sps_key = profile_key(self.model_name, self.device, config.dtype, torch.get_num_threads(),
                                   block_size, self.model.quantization, tp, config.deterministic,
                                   config.tp_invariant)
        if drafter is not None and sched_config.verify_policy in ("scheduled", "causal"):
            self.sps = load_or_profile(self.runner, self.block_manager, self.sps_key,
                                       sched_config.max_num_batched_tokens)
        self.scheduler = Scheduler(sched_config, self.block_manager, self.sps)
        if drafter is not None:  # the policy above is the drafter's; predictions ride along
            self.runner.drafter = PredictionDrafter(drafter)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.last_step: StepStats | None = None
        self._pending: list[tuple[RequestUpdate, float | None]] = []
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="dspark-forward") if config.overlap else None
        self._ids = itertools.count()
        logger.info("loaded %s (%s, %d layers) on %s/%s (quantization %s) in %.1fs; attention=%s, KV cache %d blocks x %d "
                    "tokens, max_model_len %d", self.model_name, ckpt.arch.arch, ckpt.arch.num_layers,
                    self.device, config.dtype, self.model.quantization, time.perf_counter() - t0, self.backend.name, num_blocks,
                    block_size, self.max_model_len)

    def grammar_compiler(self) -> GrammarCompiler:
        """Built on first use (~1 s): a server that never sees a structured output never pays."""
        if self.runner.grammar is None:
            self.runner.grammar = GrammarMasks(GrammarCompiler(self.tokenizer, self.arch.vocab_size))
        return self.runner.grammar.compiler

    def _target_handle(self) -> TargetHandle:
        m = self.model
        return TargetHandle(m.embed_tokens, m.norm, m.lm_head, self.arch.hidden_size,
                            self.arch.vocab_size, self.arch.num_layers, self.device,
                            self.config.torch_dtype)

    def _num_blocks_from_memory(self, block_size: int, dtype: torch.dtype, drafter_bytes: int) -> int:
        """`drafter_bytes`: the drafter's paged context per block."""
        per_block = PagedKVCache.bytes_per_block(self.kv_arch, block_size, dtype) + drafter_bytes
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - total * (1 - self.config.cache.gpu_memory_utilization)
        else:
            budget = self.config.cache.kv_cache_bytes
        # never more than the model can use for max_num_seqs full-length sequences
        cap = self.config.scheduler.max_num_seqs * cdiv(self.arch.max_position_embeddings, block_size)
        return max(1, min(int(budget // per_block), cap))

    # ---- requests ---------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams,
                    req_id: str | None = None, arrival_time: float | None = None,
                    prompt_parent: str | None = None, cache_salt: str | None = None) -> str:
        """Validate, tokenise and queue a request; returns its id. Raises InvalidRequest.

        `prompt_parent`: an earlier request of the same prompt (n > 1) whose prompt KV this
        one shares when both are still to be prefilled; otherwise it prefills on its own.
        `cache_salt`: only requests with the same salt share prefix-cache blocks."""
        prompt_ids = self.tokenize_prompt(prompt)
        req_id = req_id if req_id is not None else f"req-{next(self._ids)}"
        self.validate_lengths(len(prompt_ids), params)
        self.validate_token_ids(params)
        if params.structured is not None:
            self.grammar_compiler().check(params.structured)
        if params.prediction is not None and self.runner.drafter is None and not self.runner.drafting_failed:
            # plain decoding until now: the runner drafts from predictions from here on (set
            # between steps, so no forward sees it change)
            self.runner.drafter = PredictionDrafter(None)
        req = Request(req_id, prompt_ids, params, eos_token_ids=self.tokenizer.eos_token_ids,
                      max_model_len=self.max_model_len, prompt_parent=prompt_parent,
                      cache_salt=cache_salt)
        if arrival_time is not None:
            req.arrival_time = arrival_time
        self.scheduler.add_request(req)
        self.output_processor.add_request(req_id, prompt_ids, list(params.stop), req.arrival_time,
                                          logprobs=params.logprobs is not None)
        return req_id

    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            ids = list(prompt)
            if any(not isinstance(t, int) or not 0 <= t < self.arch.vocab_size for t in ids):
                raise InvalidRequest(f"prompt token ids must be integers in [0, {self.arch.vocab_size})", "prompt")
        if not ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        return ids

    def validate_lengths(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        if num_prompt_tokens >= self.max_model_len:
            raise InvalidRequest(
                f"this model's maximum context length is {self.max_model_len} tokens, but the prompt "
                f"has {num_prompt_tokens} tokens (at least one token must be left to generate)", "messages")

    def validate_token_ids(self, params: SamplingParams) -> None:
        vocab = self.arch.vocab_size
        if any(t >= vocab for t in params.logit_bias):
            raise InvalidRequest(f"logit_bias keys must be token ids in [0, {vocab})", "logit_bias")
        if params.prediction is not None and any(t >= vocab for t in params.prediction):
            raise InvalidRequest(f"prediction token ids must be in [0, {vocab})", "prediction")
        if any(t >= vocab for t in params.stop_token_ids):
            raise InvalidRequest(f"stop_token_ids must be token ids in [0, {vocab})", "stop_token_ids")

    def abort_request(self, req_id: str) -> None:
        self.scheduler.finish_request(req_id, RequestStatus.FINISHED_ABORTED)
        self.output_processor.remove(req_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    # ---- one step ---------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run one flat forward, commit. With overlap on, the forward runs on a
        worker thread while this thread turns the previous step's tokens into outputs
        (detokenisation, stop strings), so those outputs come back one step later."""
        sched_out = self.scheduler.schedule()
        if sched_out.empty:
            return self._process(self._take_pending())
        # Read before the step runs: a request that finishes in it leaves `scheduler.requests`.
        scheduled_at = {s.req_id: self.scheduler.requests[s.req_id].first_scheduled_time
                        for s in sched_out.scheduled}
        if self._worker is None:
            runner_out = self.runner.execute(sched_out)
            outputs: list[RequestOutput] = []
        else:
            future = self._worker.submit(self.runner.execute, sched_out)
            outputs = self._process(self._take_pending())
            runner_out = future.result()
        updates = self.scheduler.update_from_output(sched_out, runner_out)
        self._record_step(sched_out, runner_out, updates)
        self._pending = [(u, scheduled_at.get(u.req_id)) for u in updates]
        if self._worker is None:
            outputs = self._process(self._take_pending())
        return outputs

    def _take_pending(self) -> list[tuple[RequestUpdate, float | None]]:
        pending, self._pending = self._pending, []
        return pending

    def _process(self, pending: list[tuple[RequestUpdate, float | None]]) -> list[RequestOutput]:
        outputs = []
        for update, scheduled_at in pending:
            if not self.output_processor.knows(update.req_id):
                continue  # aborted after its step ran
            out, stopped_by_string = self.output_processor.process(update)
            out.first_scheduled_time = scheduled_at
            if stopped_by_string:
                # With overlap the request may already run in the next step; it is dropped
                # when that step's results come back.
                self.scheduler.finish_request(update.req_id, RequestStatus.FINISHED_STOPPED)
            outputs.append(out)
        return outputs

    def _record_step(self, sched_out: SchedulerOutput, runner_out: ModelRunnerOutput,
                     updates: list[RequestUpdate]) -> None:
        verified: dict[str, int] = {}
        accepted: dict[str, int] = {}
        for u in updates:
            if u.num_draft_tokens:
                verified[u.draft_source] = verified.get(u.draft_source, 0) + u.num_draft_tokens
                accepted[u.draft_source] = accepted.get(u.draft_source, 0) + u.num_accepted_tokens
        self.last_step = StepStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            num_scheduled_tokens=sched_out.num_tokens, kv_usage=self.block_manager.usage,
            verify_lengths=[s.num_draft_tokens for s in sched_out.scheduled if s.num_draft_tokens],
            num_verify_tokens=sched_out.num_verify_tokens, expected_accepted=sched_out.expected_accepted,
            num_accepted=sum(u.num_accepted_tokens for u in updates),
            verified_by_source=verified, accepted_by_source=accepted,
            num_drafted=sum(map(len, runner_out.draft_token_ids or [])),
            forward_seconds=runner_out.forward_seconds, draft_seconds=runner_out.draft_seconds)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
        if isinstance(self.model, TensorParallelLM):
            self.model.close()

    def prompt_logits(self, prompt_ids: list[int]) -> torch.Tensor:
        """Logits [len(prompt_ids), vocab] of one standalone prefill (for checks against
        reference implementations); borrows KV blocks and returns them."""
        req = Request("prompt-logits", list(prompt_ids), SamplingParams(max_tokens=1))
        if not self.block_manager.can_allocate(req, len(prompt_ids)):
            raise CapacityExceeded("not enough free KV blocks for a standalone prefill")
        self.block_manager.allocate(req, len(prompt_ids))
        try:
            step = SchedulerOutput([ScheduledRequest(req.req_id, req.prompt_ids, 0, req.block_table,
                                                     req.params, sample=False, num_output_tokens=0)])
            return self.runner.all_logits(step)
        finally:
            self.block_manager.free(req)
