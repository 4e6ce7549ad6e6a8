"""The logical request: what it has committed, what it may do next."""

import enum
import time
from dataclasses import dataclass, field

from scheduler.outputs import TokenLogprob
from scheduler.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    # the step computed something unusable for it (non-finite logits): stopped, nothing sent
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR)

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.finished else None


@dataclass(slots=True, eq=False)  # identity equality: queues remove requests by identity
class Request:
    """One generation. `token_ids` holds prompt then output; KV covers the first `num_computed_tokens`."""

    req_id: str
    prompt_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int = 1 << 30
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(init=False)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    # Speculative decoding: the drafter's latest proposal, verified in the next step.
    draft_token_ids: list[int] = field(default_factory=list)
    draft_confidences: list[float] | None = None
    draft_source: str = ""
    # the proposal came from a probe draft: verified whatever the capacity, so that probes
    # measure realised acceptance, not only the drafter's confidence
    draft_probe: bool = False
    num_spec_rounds: int = 0
    num_draft_tokens_verified: int = 0
    num_accepted_tokens: int = 0
    # False: admitted while the verify policy rested the drafter (beyond the probes' pool) or
    # onto cached blocks that lack drafter context; it decodes plain to the end, the drafter
    # never pays its context pass, and its cached blocks are marked as lacking that context.
    draft_context: bool = True
    # n > 1: the request whose prompt KV this one shares (the first choice of the same prompt)
    prompt_parent: str | None = None
    # Prefix caching: tenants with different salts never share cached blocks.
    cache_salt: str | None = None
    block_hashes: list[bytes] = field(default_factory=list)  # keys of its full blocks so far
    num_cached_blocks: int = 0  # leading blocks of `block_table` already offered to the cache
    num_cached_tokens: int = 0  # prompt tokens its first admission found in the cache
    # params.prompt_logprobs: one entry per prompt token, filled as prefill chunks run (the
    # first token has none); handed out with the first output token.
    prompt_logprobs: list[TokenLogprob | None] | None = field(init=False)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids)
        self.prompt_logprobs = None if self.params.prompt_logprobs is None else [None] * len(self.prompt_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def is_decoding(self) -> bool:
        """All tokens but the last are in the KV cache: the next step decodes (and verifies)."""
        return self.num_computed_tokens == self.num_tokens - 1

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    def append_token(self, token_id: int) -> RequestStatus | None:
        """Commit one sampled token; return the finished status it causes, if any."""
        self.token_ids.append(token_id)
        if not self.params.ignore_eos and token_id in self.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if token_id in self.params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= self.params.max_tokens or self.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
