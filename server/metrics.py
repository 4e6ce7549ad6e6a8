"""Prometheus metrics, `dspark:`-prefixed and labelled by model_name, in a registry per app.

Per-request series are observed as outputs pass through `RequestTracker`; the gauges (running,
waiting, KV usage) are refreshed from the engine's stats at scrape time.
"""

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from engine.async_engine import EngineStats
from engine.llm_engine import StepStats
from engine.output_processor import RequestOutput
from scheduler import CapacityExceeded, InvalidRequest, RequestFailed
from scheduler.block_manager import PrefixCacheStats
from scheduler.outputs import PREDICTION_SOURCE

FINISH_REASONS = ("stop", "length", "abort", "error")
KV_BLOCK_STATES = ("referenced", "cached", "empty")

# CPU steps take 10-500 ms and prefill can queue for seconds, so buckets reach further than
# vLLM's GPU-sized ones.
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0,
                    2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_TOKS_PER_S_BUCKETS = (1, 2, 5, 10, 15, 20, 25, 30, 40, 50, 60, 75, 100, 125, 150, 200, 250, 300,
                       400, 500, 750, 1000, 2000)
_ACCEPTED_LEN_BUCKETS = tuple(range(17))
_STEP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                         0.5, 0.75, 1.0, 2.0, 5.0)
_CAPACITY_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Statuses counted from the start (at zero) so that rate() sees the first error.
ERROR_STATUSES = ("400", "401", "404", "413", "429", "500", "503")
_VERIFY_TOKENS_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32, 48, 64)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, m = self.registry, ["model_name"]
        self.ttft = Histogram("dspark:time_to_first_token_seconds",
                              "Time from arrival to the first output token", m,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("dspark:inter_token_latency_seconds",
                             "Time between consecutive outputs of one request", m,
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("dspark:e2e_request_latency_seconds",
                             "Time from arrival to the last token", m,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("dspark:request_queue_time_seconds",
                                    "Time from arrival until the scheduler first admits it",
                                    m, buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens_per_s = Histogram(
            "dspark:request_output_tokens_per_second",
            "Per-user decode speed: (output tokens - 1) / (last token time - first token time)",
            m, buckets=_TOKS_PER_S_BUCKETS, registry=r)
        self.prompt_tokens = Counter("dspark:prompt_tokens", "Prompt tokens of finished requests",
                                     m, registry=r)
        self.generation_tokens = Counter("dspark:generation_tokens", "Generated tokens", m,
                                         registry=r)
        self.request_success = Counter("dspark:request_success",
                                       "Finished requests by finish reason (abort: client left)",
                                       [*m, "finish_reason"], registry=r)
        self.running = Gauge("dspark:num_requests_running", "Requests in the running batch", m,
                             registry=r)
        self.waiting = Gauge("dspark:num_requests_waiting", "Requests waiting to be scheduled", m,
                             registry=r)
        self.kv_usage = Gauge("dspark:kv_cache_usage_ratio", "Fraction of KV blocks in use", m,
                              registry=r)
        # prefix cache, in tokens (vLLM's names); the pool's blocks by state, for leak checks
        self.prefix_queries = Counter("dspark:prefix_cache_queries",
                                      "Tokens of admitted requests looked up in the prefix cache", m, registry=r)
        self.prefix_hits = Counter("dspark:prefix_cache_hits", "Tokens found in the prefix cache", m,
                                   registry=r)
        self.kv_blocks = Gauge("dspark:kv_cache_blocks", "KV blocks by state: referenced by requests, "
                               "cached (free, holding a reusable prefix), empty", [*m, "state"], registry=r)
        self._prefix_seen = (0, 0)
        # Speculative decoding: present from the start, zero until an engine drafts.
        self.spec_draft = Counter("dspark:spec_decode_num_draft_tokens", "Drafted tokens", m,
                                  registry=r)
        self.spec_accepted = Counter("dspark:spec_decode_num_accepted_tokens",
                                     "Accepted draft tokens", m, registry=r)
        self.spec_verify = Counter("dspark:spec_decode_num_verify_tokens",
                                   "Draft tokens sent to verification", m, registry=r)
        # per draft source: the drafter (by name) or "prediction" (Predicted Outputs)
        self.spec_source_verify = Counter("dspark:spec_decode_source_verify_tokens",
                                          "Draft tokens sent to verification, by draft source",
                                          [*m, "source"], registry=r)
        self.spec_source_accepted = Counter("dspark:spec_decode_source_accepted_tokens",
                                            "Accepted draft tokens, by draft source", [*m, "source"],
                                            registry=r)
        self.spec_accepted_len = Histogram("dspark:spec_decode_accepted_length",
                                           "Tokens committed per speculation round", m,
                                           buckets=_ACCEPTED_LEN_BUCKETS, registry=r)
        self.spec_verify_per_req = Histogram("dspark:spec_decode_verify_tokens_per_request",
                                             "Draft tokens verified per request per step", m,
                                             buckets=_VERIFY_TOKENS_BUCKETS, registry=r)
        self.spec_expected = Counter("dspark:spec_decode_expected_accepted_tokens",
                                     "Draft tokens the confidences expected to be accepted", m,
                                     registry=r)
        self.spec_capacity = Histogram("dspark:spec_decode_capacity",
                                       "Draft tokens admitted to verification per step (K)", m,
                                       buckets=_CAPACITY_BUCKETS, registry=r)
        self.draft_time = Histogram("dspark:spec_decode_draft_time_seconds",
                                    "Time per engine step spent drafting", m,
                                    buckets=_STEP_SECONDS_BUCKETS, registry=r)
        self.verify_time = Histogram("dspark:spec_decode_verify_time_seconds",
                                     "Time per engine step in the target forward and sampling", m,
                                     buckets=_STEP_SECONDS_BUCKETS, registry=r)
        self.request_errors = Counter("dspark:request_errors",
                                      "Requests answered with an HTTP error status",
                                      [*m, "status_code"], registry=r)
        self.model_name: str | None = None

    def bind_model(self, model_name: str) -> None:
        """Create every labelled series (at zero) once the served model name is known."""
        self.model_name = model_name
        for metric in (self.ttft, self.itl, self.e2e, self.queue_time, self.tokens_per_s,
                       self.prompt_tokens, self.generation_tokens, self.running, self.waiting,
                       self.kv_usage, self.prefix_queries, self.prefix_hits, self.spec_draft, self.spec_accepted, self.spec_verify,
                       self.spec_accepted_len, self.spec_verify_per_req, self.spec_expected,
                       self.spec_capacity, self.draft_time, self.verify_time):
            metric.labels(model_name)
        for counter in (self.spec_source_verify, self.spec_source_accepted):
            counter.labels(model_name, PREDICTION_SOURCE)  # drafters' sources appear as they draft
        for state in KV_BLOCK_STATES:
            self.kv_blocks.labels(model_name, state)
        for reason in FINISH_REASONS:
            self.request_success.labels(model_name, reason)
        for status in ERROR_STATUSES:
            self.request_errors.labels(model_name, status)

    def observe_step(self, stats: StepStats) -> None:
        """Per-step series; called on the engine thread (prometheus_client is thread-safe)."""
        if self.model_name is None:
            return
        model = self.model_name
        self.verify_time.labels(model).observe(stats.forward_seconds)
        if stats.draft_seconds:
            self.draft_time.labels(model).observe(stats.draft_seconds)
        self.spec_draft.labels(model).inc(stats.num_drafted)
        if stats.verify_lengths:
            self.spec_verify.labels(model).inc(stats.num_verify_tokens)
            self.spec_accepted.labels(model).inc(stats.num_accepted)
            self.spec_expected.labels(model).inc(stats.expected_accepted)
            self.spec_capacity.labels(model).observe(stats.num_verify_tokens)
            for n in stats.verify_lengths:
                self.spec_verify_per_req.labels(model).observe(n)
            for source, n in stats.verified_by_source.items():
                self.spec_source_verify.labels(model, source).inc(n)
                self.spec_source_accepted.labels(model, source).inc(stats.accepted_by_source.get(source, 0))

    def count_error(self, status: int) -> None:
        if self.model_name is not None and status >= 400:
            self.request_errors.labels(self.model_name, str(status)).inc()

    def render(self, stats: EngineStats) -> bytes:
        """The exposition text, with the gauges refreshed from `stats`."""
        if self.model_name is not None:
            self.running.labels(self.model_name).set(stats.num_running)
            self.waiting.labels(self.model_name).set(stats.num_waiting)
            self.kv_usage.labels(self.model_name).set(stats.kv_cache_usage)
            self._observe_prefix_cache(stats.prefix_cache)
        return generate_latest(self.registry)

    def _observe_prefix_cache(self, s: PrefixCacheStats) -> None:
        """The block manager counts since start; the counters take what is new since the last scrape."""
        model = self.model_name
        seen_queries, seen_hits = self._prefix_seen
        self.prefix_queries.labels(model).inc(max(0, s.queries - seen_queries))
        self.prefix_hits.labels(model).inc(max(0, s.hits - seen_hits))
        self._prefix_seen = (max(s.queries, seen_queries), max(s.hits, seen_hits))
        for state, n in zip(KV_BLOCK_STATES, (s.num_referenced_blocks, s.num_cached_free_blocks, s.num_empty_blocks)):
            self.kv_blocks.labels(model, state).set(n)

    def track(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        assert self.model_name is not None, "bind_model() first"
        return RequestTracker(self, self.model_name).wrap(outputs)


class RequestTracker:
    """Observes one request's outputs on their way to the client."""

    def __init__(self, metrics: Metrics, model_name: str) -> None:
        self.m = metrics
        self.model = model_name
        self.last_output_time: float | None = None
        self.num_spec_rounds = 0
        self.final: RequestOutput | None = None

    async def wrap(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        refused = False
        ended = "abort"
        try:
            async with aclosing(outputs):  # closing this wrapper closes (aborts) the request
                async for out in outputs:
                    self._on_output(out)
                    yield out
        except (InvalidRequest, CapacityExceeded):
            refused = True  # never admitted: not a request that ran, so not an abort either
            raise
        except RequestFailed:
            ended = "error"  # the engine stopped it (non-finite logits)
            raise
        finally:
            if self.final is None and not refused:
                self.m.request_success.labels(self.model, ended).inc()

    def _on_output(self, out: RequestOutput) -> None:
        # Receipt time on the event loop: what a client sees, including the loop hop.
        now = time.monotonic()
        if out.delta_token_ids:
            if self.last_output_time is not None:
                self.m.itl.labels(self.model).observe(now - self.last_output_time)
            self.last_output_time = now
        if out.num_spec_rounds > self.num_spec_rounds:
            rounds = out.num_spec_rounds - self.num_spec_rounds
            self.m.spec_accepted_len.labels(self.model).observe(len(out.delta_token_ids) / rounds)
            self.num_spec_rounds = out.num_spec_rounds
        if out.finished:
            self.final = out
            self._on_finish(out)

    def _on_finish(self, out: RequestOutput) -> None:
        m, model = self.m, self.model
        m.request_success.labels(model, out.finish_reason or "stop").inc()
        m.prompt_tokens.labels(model).inc(out.num_prompt_tokens)
        m.generation_tokens.labels(model).inc(len(out.token_ids))
        if out.first_scheduled_time is not None:
            m.queue_time.labels(model).observe(out.first_scheduled_time - out.arrival_time)
        if out.first_token_time is not None:
            m.ttft.labels(model).observe(out.first_token_time - out.arrival_time)
        if out.finished_time is not None:
            m.e2e.labels(model).observe(out.finished_time - out.arrival_time)
            decode_time = out.finished_time - (out.first_token_time or out.finished_time)
            if len(out.token_ids) > 1 and decode_time > 0:
                m.tokens_per_s.labels(model).observe((len(out.token_ids) - 1) / decode_time)
