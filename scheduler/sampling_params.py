"""Per-request sampling parameters, validated on construction."""

import json
import math
from dataclasses import dataclass, field

from scheduler.errors import InvalidRequest

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MAX_TOP_LOGPROBS = 20  # OpenAI's bound for chat's top_logprobs


STRUCTURED_KINDS = ("json_schema", "json_object", "regex", "choice", "lark")


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """A constraint on the output, compiled to a grammar by engine/grammar.py. `value`: the JSON
    schema as JSON text (json_schema), a regular expression (regex), a JSON list of strings
    (choice), a llguidance Lark grammar (lark); unused for json_object (any JSON object). `field`: the request field it came
    from, named by errors."""

    kind: str
    value: str = ""
    field: str = "response_format"

    @property
    def choices(self) -> list[str]:
        return json.loads(self.value)


@dataclass(slots=True)
class SamplingParams:
    """Sampling parameters, shaped like vLLM's. `top_k <= 0` and `top_p == 1` disable those filters."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # Logits processing, in vLLM's order: bias, then penalties, then temperature, then the
    # min-p / top-k / top-p filters. Frequency and presence count the generated tokens (OpenAI),
    # repetition divides the logits of every token seen in prompt or output (vLLM's extra).
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    # None: no log-probabilities; k >= 0: the chosen token's plus the k most likely alternatives
    logprobs: int | None = None
    # None: none; k >= 0: each prompt token's log-probability under the raw logits (no bias,
    # penalties or temperature: the model's own scoring of the text, as vLLM's), plus k
    # alternatives. The first prompt token has none.
    prompt_logprobs: int | None = None
    speculative: bool = True  # False: this request is never drafted for (plain decoding)
    structured: StructuredOutput | None = None  # tokens outside the grammar are never sampled
    # Predicted Outputs: token ids of the expected output, drafted from (never forced: the
    # output is what it would be without them)
    prediction: list[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple, type(None))):
            raise InvalidRequest("stop must be a string or a list of strings", "stop")
        if not isinstance(self.stop_token_ids, (list, tuple, type(None))):
            raise InvalidRequest("stop_token_ids must be a list of integers", "stop_token_ids")
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not isinstance(self.logit_bias, dict):
            raise InvalidRequest("logit_bias must map token ids to biases", "logit_bias")
        self.logit_bias = dict(self.logit_bias)
        self.validate()

    def validate(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens <= 0:
            raise InvalidRequest(f"max_tokens must be a positive integer, got {self.max_tokens!r}", "max_tokens")
        if not _is_number(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise InvalidRequest(f"temperature must be in [0, 100], got {self.temperature!r}", "temperature")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise InvalidRequest(f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}", "top_k")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise InvalidRequest(f"seed must be an integer in [0, 2^63), got {self.seed!r}", "seed")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}", "stop")
        for s in self.stop:
            if not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_STRING_LEN:
                raise InvalidRequest(
                    f"each stop string must be a non-empty string of at most {MAX_STOP_STRING_LEN} characters", "stop"
                )
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise InvalidRequest("stop_token_ids must be non-negative integers", "stop_token_ids")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise InvalidRequest(f"{name} must be in [-2, 2], got {value!r}", name)
        if not _is_number(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 10.0:
            raise InvalidRequest(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty!r}",
                                 "repetition_penalty")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequest(f"min_p must be in [0, 1], got {self.min_p!r}", "min_p")
        for token_id, bias in self.logit_bias.items():
            if not _is_int(token_id) or token_id < 0:
                raise InvalidRequest(f"logit_bias keys must be token ids, got {token_id!r}", "logit_bias")
            if not _is_number(bias) or not -100.0 <= bias <= 100.0:
                raise InvalidRequest(f"logit_bias values must be in [-100, 100], got {bias!r}", "logit_bias")
        if self.logprobs is not None and (not _is_int(self.logprobs)
                                          or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise InvalidRequest(f"the number of top logprobs must be in [0, {MAX_TOP_LOGPROBS}], "
                                 f"got {self.logprobs!r}", "top_logprobs")
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs)
                                                 or not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS):
            raise InvalidRequest(f"the number of top prompt logprobs must be in [0, {MAX_TOP_LOGPROBS}], "
                                 f"got {self.prompt_logprobs!r}", "prompt_logprobs")
        if self.structured is not None and (not isinstance(self.structured, StructuredOutput)
                                            or self.structured.kind not in STRUCTURED_KINDS):
            raise InvalidRequest(f"structured output must be one of {', '.join(STRUCTURED_KINDS)}",
                                 getattr(self.structured, "field", "response_format"))
        if self.prediction is not None and (not isinstance(self.prediction, list)
                                            or not all(_is_int(t) and t >= 0 for t in self.prediction)):
            raise InvalidRequest("prediction must be a list of token ids", "prediction")
        if not isinstance(self.speculative, bool):
            raise InvalidRequest("speculative must be a boolean", "speculative")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def processes_logits(self) -> bool:
        """Whether bias or penalties change this request's logits before temperature."""
        return bool(self.logit_bias) or self.has_penalties


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)
