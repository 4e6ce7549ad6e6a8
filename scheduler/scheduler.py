"""Continuous batching: FCFS admission by free KV blocks, chunked prefill, preemption by recompute.

There is no prefill or decode phase. Each request has `num_computed_tokens`; each step gives
every running request the tokens it still lacks (one for a decode, a chunk for a prefill),
within a per-step token budget, then admits waiting requests in arrival order.
"""

import logging
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from scheduler.block_manager import BlockManager
from scheduler.errors import CapacityExceeded
from scheduler.outputs import ModelRunnerOutput, RequestUpdate, ScheduledRequest, SchedulerOutput
from scheduler.request import Request, RequestStatus
from scheduler.verify_planner import StepsPerSecond, survival
from scheduler.verify_policy import DraftRoom, make_verify_policy

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    # Per-step token budget; also the largest prefill chunk.
    max_num_batched_tokens: int = 512
    # Waiting requests beyond this are refused (CapacityExceeded: 503 with Retry-After at the
    # server); 0: no limit (the offline engine's default; `dspark serve` bounds it, server/cli.py).
    max_waiting: int = 0
    # How many draft tokens each decoding request verifies (see scheduler/verify_policy.py);
    # "auto": "scheduled" for drafters that give confidences, else "fixed".
    verify_policy: str = "auto"
    verify_threshold: float = 0.5  # for verify_policy="threshold"


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 sps: StepsPerSecond | None = None) -> None:
        """`sps` is the engine's throughput curve, needed by confidence-scheduled policies."""
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_since_last_step: list[str] = []
        # n > 1: requests waiting for their prompt parent's prefill, to share its KV blocks
        self._parked: dict[str, list[Request]] = {}
        self.num_preemptions = 0
        self._probe_turn = 0  # rotates which requests a probe draft samples
        policy = "fixed" if config.verify_policy == "auto" else config.verify_policy
        self.verify_policy = make_verify_policy(policy, sps, config.verify_threshold)

    # ---- queue management -------------------------------------------------------------

    def add_request(self, req: Request) -> None:
        if self.config.max_waiting and len(self.waiting) >= self.config.max_waiting:
            raise CapacityExceeded(f"the waiting queue is full ({self.config.max_waiting} requests)")
        if req.req_id in self.requests:
            raise ValueError(f"duplicate request id {req.req_id!r}")
        self.requests[req.req_id] = req
        parent = self.requests.get(req.prompt_parent) if req.prompt_parent else None
        if (parent is not None and parent.num_computed_tokens == 0 and parent.prompt_ids == req.prompt_ids
                and self.fork_num_tokens(req) > 0):
            self._parked.setdefault(parent.req_id, []).append(req)  # forked when its prefill ends
        else:
            self.waiting.append(req)  # shares nothing: it prefills on its own

    def fork_num_tokens(self, req: Request) -> int:
        """Prompt tokens a request shares with its prompt parent: the full blocks before the
        last prompt token (whose logits each choice computes itself)."""
        bs = self.block_manager.block_size
        return (req.num_prompt_tokens - 1) // bs * bs

    def finish_request(self, req_id: str, status: RequestStatus) -> None:
        """End a request from outside (abort, stop string); a no-op for unknown or ended ids."""
        assert status.finished
        req = self.requests.get(req_id)
        if req is None:
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.prompt_parent in self._parked and req in self._parked[req.prompt_parent]:
            self._parked[req.prompt_parent].remove(req)
        else:
            self.waiting.remove(req)
        self._finish(req, status)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or any(self._parked.values()))

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- one step ---------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted = 0
        verify_lengths, expected = self._plan_verify_lengths()

        # Running requests first, oldest first; the newest are preempted when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            assert num_new > 0, "a running request always has a token to compute"
            num_draft = 0
            if req.is_decoding:
                num_draft = min(verify_lengths.get(req.req_id, 0), budget - 1, self._max_useful_drafts(req))
                num_new += num_draft
            while not self.block_manager.can_allocate(req, req.num_computed_tokens + num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted += 1
                if victim is req:
                    break
            else:
                self.block_manager.allocate(req, req.num_computed_tokens + num_new)
                scheduled.append(self._scheduled(req, num_new, num_draft))
                budget -= num_new
                i += 1
                continue
            break  # `req` itself was preempted: nothing younger is left to schedule

        # Then waiting requests in arrival order; a head that does not fit blocks the rest,
        # so nobody is starved by younger, smaller requests. No admission in a step that had
        # to preempt: memory is tight.
        while (self.waiting and budget > 0 and not preempted
               and len(self.running) < self.config.max_num_seqs):
            req = self.waiting[0]
            # a forked choice holds its shared blocks; anyone else may find a cached prefix
            hit = [] if req.block_table else self._with_draft_context(req, self.block_manager.cached_prefix(req))
            start = req.num_computed_tokens + len(hit) * self.block_manager.block_size
            num_new = min(req.num_tokens - start, budget)
            # Keep one free block per running request so decodes can grow without thrashing.
            reserve = len(self.running)
            if req.block_table:
                if not self.block_manager.can_allocate(req, start + num_new, reserve):
                    break
            elif self.block_manager.can_take(req, hit, start + num_new, reserve):
                req.num_computed_tokens = self.block_manager.take(req, hit)
                if req.first_scheduled_time is None:
                    req.num_cached_tokens = req.num_computed_tokens
            else:
                break
            self.waiting.popleft()
            self.block_manager.allocate(req, start + num_new)
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
            self.running.append(req)
            scheduled.append(self._scheduled(req, num_new))
            budget -= num_new

        finished, self._finished_since_last_step = self._finished_since_last_step, []
        num_verify = sum(s.num_draft_tokens for s in scheduled)
        expected_accepted = sum(float(expected[s.req_id][:s.num_draft_tokens].sum())
                                for s in scheduled if s.num_draft_tokens)
        room = self.verify_policy.draft_room()
        self._assign_draft_room(scheduled, room)
        return SchedulerOutput(scheduled=scheduled, finished_req_ids=finished, num_preempted=preempted,
                               num_verify_tokens=num_verify, expected_accepted=expected_accepted,
                               draft_probe=room.is_probe)

    def _with_draft_context(self, req: Request, hit: list[int]) -> list[int]:
        """Settle at `req`'s first admission whether it keeps drafter context (not while the
        drafter rests and its probes' pool is full, nor onto cached blocks lacking that
        context); return the part of the cached prefix `hit` it takes."""
        if not req.draft_context:
            return hit
        with_context = self.block_manager.draft_context_prefix(hit)
        if req.first_scheduled_time is None:
            pool = self.verify_policy.context_pool
            if with_context < len(hit) or (pool is not None and sum(r.draft_context for r in self.running) >= pool):
                req.draft_context = False
                return hit
        return hit[:with_context]  # a preempted request that drafts recomputes the rest

    def _assign_draft_room(self, scheduled: list[ScheduledRequest], room: DraftRoom) -> None:
        """Every request with drafter context gets the room's positions; a probe's go to
        `max_requests` of the sampling ones only, taken in turn over the steps so every
        request is sampled."""
        for s in scheduled:
            s.max_draft_positions = room.positions if s.draft_context else 0
        sampling = [s for s in scheduled if s.sample and s.draft_context]
        if room.max_requests is None or len(sampling) <= room.max_requests:
            return
        chosen = {sampling[(self._probe_turn + i) % len(sampling)].req_id for i in range(room.max_requests)}
        self._probe_turn += room.max_requests
        for s in sampling:
            if s.req_id not in chosen:
                s.max_draft_positions = 0

    def update_from_output(self, sched_out: SchedulerOutput,
                           runner_out: ModelRunnerOutput) -> list[RequestUpdate]:
        """Apply a finished step to the logical requests; return what each one gained."""
        updates: list[RequestUpdate] = []
        if runner_out.draft_token_ids and any(runner_out.draft_token_ids) and not sched_out.draft_probe:
            self.verify_policy.observe_draft_seconds(runner_out.draft_pass_seconds)
        for idx, (sched, req_id, sampled) in enumerate(zip(
                sched_out.scheduled, runner_out.req_ids, runner_out.sampled_token_ids, strict=True)):
            assert sched.req_id == req_id
            req = self.requests.get(req_id)
            if req is None or req.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            scored = runner_out.prompt_logprobs[idx] if runner_out.prompt_logprobs else None
            if scored is not None and req.prompt_logprobs is not None:
                first, values = scored  # a recomputed chunk rewrites the same values
                req.prompt_logprobs[first:first + len(values)] = values
            if idx in runner_out.failed:
                self.block_manager.uncache(req)
                self.running.remove(req)
                self._finish(req, RequestStatus.FINISHED_ERROR)
                updates.append(RequestUpdate(req_id, [], RequestStatus.FINISHED_ERROR.finish_reason,
                                             req.num_prompt_tokens))
                continue
            if sched.fork_req_ids and sched.sample:
                self._fork_parked(req)  # its prompt is now in the KV: the other choices share it
            # Drafts past the first rejection left garbage KV: roll it back by length.
            num_accepted = len(sampled) - 1 if sched.num_draft_tokens else 0
            verified_source = req.draft_source if sched.num_draft_tokens else ""
            req.num_computed_tokens += sched.num_tokens - (sched.num_draft_tokens - num_accepted)
            self.block_manager.cache_blocks(req)
            if sched.num_draft_tokens:
                self.verify_policy.observe(sched.num_draft_tokens, num_accepted, req.draft_confidences,
                                           req.draft_source)
                req.num_spec_rounds += 1
                req.num_draft_tokens_verified += sched.num_draft_tokens
                req.num_accepted_tokens += num_accepted
                self.block_manager.rollback(req, req.num_computed_tokens)
            new_ids: list[int] = []
            status = None
            for token_id in sampled:
                new_ids.append(token_id)
                status = req.append_token(token_id)
                if status is not None:
                    break  # tokens after a stop are never emitted
            if status is not None:
                self.running.remove(req)
                self._finish(req, status)
            elif runner_out.draft_token_ids is not None:
                req.draft_token_ids = runner_out.draft_token_ids[idx]
                req.draft_confidences = (runner_out.draft_confidences[idx]
                                         if runner_out.draft_confidences else None)
                req.draft_source = runner_out.draft_sources[idx] if runner_out.draft_sources else ""
                req.draft_probe = sched_out.draft_probe and bool(req.draft_token_ids)
            if new_ids or status is not None:
                logprobs = runner_out.logprobs[idx] if runner_out.logprobs else None
                first_output = req.num_output_tokens == len(new_ids)
                updates.append(RequestUpdate(req_id, new_ids, status.finish_reason if status else None,
                                             req.num_prompt_tokens, sched.num_draft_tokens, num_accepted,
                                             None if logprobs is None else logprobs[:len(new_ids)],
                                             req.prompt_logprobs if first_output else None,
                                             verified_source, req.num_cached_tokens))
        return updates

    # ---- helpers ----------------------------------------------------------------------

    def _plan_verify_lengths(self) -> tuple[dict[str, int], dict[str, np.ndarray]]:
        """ℓ_r and the survival probabilities a[r, :] of each decoding request with drafts."""
        decoding = [r for r in self.running if r.is_decoding and r.draft_token_ids]
        if not decoding:
            return {}, {}
        # tokens the step carries before drafts: what every running request still lacks
        base = min(sum(r.num_tokens - r.num_computed_tokens for r in self.running),
                   self.config.max_num_batched_tokens)
        lengths = self.verify_policy.verify_lengths(decoding, base)
        a = survival(self.verify_policy.confidences(decoding))
        return ({r.req_id: n for r, n in zip(decoding, lengths, strict=True)},
                {r.req_id: a[i] for i, r in enumerate(decoding)})

    @staticmethod
    def _max_useful_drafts(req: Request) -> int:
        """Drafts beyond max_tokens or the context length could never be emitted; a request
        that turned speculation off gets none."""
        if not req.params.speculative:
            return 0
        return max(0, min(len(req.draft_token_ids),
                          req.params.max_tokens - req.num_output_tokens - 1,
                          req.max_model_len - req.num_tokens - 1))

    def _scheduled(self, req: Request, num_new: int, num_draft: int = 0) -> ScheduledRequest:
        start = req.num_computed_tokens
        token_ids = req.token_ids[start:start + num_new - num_draft] + req.draft_token_ids[:num_draft]
        return ScheduledRequest(
            req_id=req.req_id,
            token_ids=token_ids,
            start_pos=start,
            block_table=list(req.block_table),
            params=req.params,
            sample=start + num_new - num_draft == req.num_tokens,
            num_output_tokens=req.num_output_tokens,
            num_draft_tokens=num_draft,
            history=req.token_ids,
            fork_req_ids=[c.req_id for c in self._parked.get(req.req_id, ())],
            draft_context=req.draft_context,
        )

    def _fork_parked(self, parent: Request) -> None:
        children = self._parked.pop(parent.req_id, [])
        for child in children:
            self.block_manager.fork(parent, child, self.fork_num_tokens(child))
            child.draft_context = parent.draft_context  # the shared blocks hold the parent's
            child.num_computed_tokens = len(child.block_table) * self.block_manager.block_size
            if child.prompt_logprobs is not None and parent.prompt_logprobs is not None:
                child.prompt_logprobs = list(parent.prompt_logprobs)  # the shared prefix is not rerun
        self.waiting.extendleft(reversed(children))  # ahead of younger requests

    def _release_parked(self, parent: Request) -> None:
        """A parent that ends before its prefill did leaves its choices to prefill alone."""
        self.waiting.extendleft(reversed(self._parked.pop(parent.req_id, [])))

    def _preempt(self, req: Request) -> None:
        """Drop the KV of `req` and queue it first in line; it recomputes prompt and output."""
        self.block_manager.free(req)
        req.num_computed_tokens = 0
        req.draft_token_ids = []
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        logger.debug("preempted %s (%d tokens)", req.req_id, req.num_tokens)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        self._release_parked(req)
        req.status = status
        self.block_manager.free(req)
        del self.requests[req.req_id]
        self._finished_since_last_step.append(req.req_id)
