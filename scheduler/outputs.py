"""The two plain data types where the logical and the physical side meet."""

from dataclasses import dataclass, field

from scheduler.sampling_params import SamplingParams

# the draft source of Predicted Outputs (draft/prediction.py); drafters go by their own names
PREDICTION_SOURCE = "prediction"


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """The target's log-probability of one emitted token (after the request's bias, penalties
    and temperature), and the `top` most likely tokens at that position, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True)
class ScheduledRequest:
    """What one request runs this step: `token_ids` at positions `start_pos`..., KV in `block_table`."""

    req_id: str
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    params: SamplingParams
    # True when this chunk reaches the end of the known tokens, so the last logits are sampled.
    sample: bool
    # Number of output tokens already committed: seeded sampling keys its randomness on it.
    num_output_tokens: int
    # The last `num_draft_tokens` of `token_ids` are draft tokens to verify (ℓ_r; 0 = plain).
    num_draft_tokens: int = 0
    # The request's committed tokens (read-only view) for drafters that look at history.
    history: list[int] | None = None
    # n > 1: requests that will share the KV of this request's full prompt blocks once this
    # chunk ends its prefill (the drafter's context, paged in the same blocks, comes along).
    fork_req_ids: list[str] = field(default_factory=list)
    # Draft positions worth proposing for this request after the step (None: the drafter's γ;
    # 0: none, the drafter only extends its context): the verify policy's room next step.
    max_draft_positions: int | None = None
    # False: the drafter neither drafts for this request nor keeps its context (Request.draft_context)
    draft_context: bool = True

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(slots=True)
class SchedulerOutput:
    """One engine step: the requests to run, in order, plus bookkeeping for the runner."""

    scheduled: list[ScheduledRequest]
    # Requests that ended since the previous step: the runner drops their per-request state.
    finished_req_ids: list[str] = field(default_factory=list)
    num_preempted: int = 0
    # Verification plan: draft tokens admitted (K), and how many of them the drafter's
    # confidences expect to be accepted (Σ survival of the admitted positions).
    num_verify_tokens: int = 0
    expected_accepted: float = 0.0
    # Whether the drafts proposed after this step are a probe (a few requests drafting while
    # the policy rests the drafter): its pass time says nothing of a full pass.
    draft_probe: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


@dataclass(slots=True)
class ModelRunnerOutput:
    """What a step produced, per scheduled request in order: the token ids it committed
    (accepted drafts, then one recovered or bonus token) and the drafter's next proposal."""

    req_ids: list[str]
    sampled_token_ids: list[list[int]]
    # per request, one entry per sampled token (None: the request asked for no logprobs)
    logprobs: list[list[TokenLogprob] | None] | None = None
    # per request asking for prompt logprobs whose chunk covered prompt tokens: (index of the
    # first prompt token scored, one entry per scored token)
    prompt_logprobs: list[tuple[int, list[TokenLogprob]] | None] | None = None
    draft_token_ids: list[list[int]] | None = None
    draft_confidences: list[list[float] | None] | None = None
    draft_sources: list[str] | None = None  # what proposed each draft (drafter name, "prediction")
    forward_seconds: float = 0.0  # target forward and (rejection) sampling
    draft_seconds: float = 0.0  # all the drafter's work this step
    # the drafting pass alone, without catching up context held while resting: what one
    # more drafting step costs (the verify policy weighs it)
    draft_pass_seconds: float = 0.0
    # indices (into req_ids) of requests whose logits were not finite: they sampled nothing
    # and are stopped with finish reason "error"
    failed: frozenset[int] = frozenset()


@dataclass(slots=True)
class RequestUpdate:
    """Per-request result of one step, for the engine's output processing."""

    req_id: str
    new_token_ids: list[int]
    finish_reason: str | None
    num_prompt_tokens: int
    num_draft_tokens: int = 0  # verified this step
    num_accepted_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # one per new token, when the request asked
    # with the first new token of a request that asked: one per prompt token (the first None)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    draft_source: str = ""  # what proposed the drafts verified this step
    num_cached_tokens: int = 0  # prompt tokens its first admission found in the prefix cache
