"""OpenAI-compatible request and response bodies (pydantic lives here, at the HTTP edge only).

Requests ignore unknown fields, as OpenAI does, and are strict about types: `"max_tokens": "5"`
or `"stream": "yes"` is a 400, not a silent coercion.
"""

import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


# Fields OpenAI documents that this server does not implement: a request that sets one is
# refused with a 400 naming it (never silently ignored). Values equal to OpenAI's default
# (e.g. response_format {"type": "text"}) are accepted.
Unsupported = Any


class ContentPart(_Body):
    type: str
    text: str | None = None


class Prediction(_Body):
    """OpenAI's Predicted Outputs: text the output is expected to repeat (e.g. the code an
    edit returns), drafted from and verified, so it only changes speed."""

    type: Literal["content"]
    content: str | list[ContentPart]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type == "text")


class GenerationRequest(_Body):
    """Fields shared by chat and text completions (sampling, streaming, bookkeeping)."""

    model: str | None = None  # None = the served model
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # vLLM's extra, over prompt and output
    logit_bias: dict[str, float] | None = None  # token id (as a string, JSON keys) -> bias
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # metadata OpenAI stores or logs; kept for logs only, never for generation
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: Literal["auto", "default"] | None = None
    # vLLM extensions that benchmark clients (vllm bench serve, aiperf) send.
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    # dspark: false decodes this request without speculation (no drafts, plain steps)
    speculative: bool = True
    # structured outputs (engine/grammar.py): OpenAI's response_format, or vLLM's guided_*
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    prediction: Prediction | None = None
    # vLLM's: only requests with the same salt share prefix-cache blocks (tenant isolation)
    cache_salt: str | None = Field(default=None, min_length=1)

    # Without max_tokens: this many (capped by the context), or None for the rest of the
    # context window (chat, as vLLM and OpenAI do).
    default_max_tokens: ClassVar[int | None] = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def max_tokens_field(self) -> str:
        """The field `requested_max_tokens` came from (errors name it)."""
        return "max_tokens"

    def unsupported(self) -> dict[str, str]:
        """Set fields this server refuses, with the reason (field -> message)."""
        return {}


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # the call a tool message answers
    refusal: str | None = None


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None  # server/tools.py
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: Unsupported = None
    function_call: Unsupported = None
    modalities: list[str] | None = None
    audio: Unsupported = None
    web_search_options: Unsupported = None
    reasoning_effort: Unsupported = None
    verbosity: Unsupported = None

    @property
    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    @property
    def max_tokens_field(self) -> str:
        return "max_tokens" if self.max_completion_tokens is None else "max_completion_tokens"

    def unsupported(self) -> dict[str, str]:
        refused = {name: f"{name} is not supported yet" for name in (
            "audio", "web_search_options", "verbosity") if getattr(self, name) is not None}
        for name in ("functions", "function_call"):
            if getattr(self, name) is not None:
                refused[name] = "the deprecated functions API is not supported: send tools and tool_choice"
        if self.reasoning_effort is not None:
            refused["reasoning_effort"] = "reasoning_effort is not supported: the served model does not reason"
        if self.modalities is not None and self.modalities != ["text"]:
            refused["modalities"] = "only the text modality is supported"
        return refused


class CompletionRequest(GenerationRequest):
    # A string or token ids; a batch (list of strings / of id lists) is refused with a clear 400.
    prompt: str | list[int] | list[str] | list[list[int]]
    default_max_tokens: ClassVar[int | None] = 16  # OpenAI's and vLLM's completions default
    logprobs: int | None = None  # 0-5 alternatives per token (OpenAI's legacy shape)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> dict[str, str]:
        refused = {}
        if self.best_of is not None and self.best_of != self.n:
            refused["best_of"] = "best_of is not supported (n choices are returned, none discarded)"
        if self.suffix:
            refused["suffix"] = "suffix (insertion) is not supported"
        return refused


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


# ---- responses ---------------------------------------------------------------------------


class SpeculativeUsage(BaseModel):
    """The request's speculative decoding, like vLLM's per-request spec metrics."""

    rounds: int  # verify steps that carried drafts
    draft_tokens: int  # drafts verified
    accepted_tokens: int
    mean_acceptance_length: float  # tokens committed per verify step: (accepted + rounds) / rounds


class PromptTokensDetails(BaseModel):
    """OpenAI's: prompt tokens whose KV came from the prefix cache instead of a prefill."""

    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    """OpenAI's: of the prediction's tokens proposed as drafts, how many the output accepted
    and how many it rejected (rejected ones still cost compute, not completion tokens)."""

    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    completion_tokens_details: CompletionTokensDetails | None = None  # only with a prediction
    speculative_decoding: SpeculativeUsage | None = None  # only with a drafter

    @model_serializer(mode="wrap")
    def _without_absent_details(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        for name in ("speculative_decoding", "completion_tokens_details"):
            if out.get(name) is None:
                out.pop(name, None)
        return out


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]
    refusal: None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: the first prompt token, when echoed
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class _Response(BaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None  # a thinking model's think block (server/reasoning.py)
    tool_calls: list[dict[str, Any]] | None = None

    @model_serializer(mode="wrap")
    def _without_absent_reasoning(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        if out.get("reasoning_content") is None:
            out.pop("reasoning_content", None)
        return out


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(BaseModel):
    index: int = 0
    # Only the keys that changed, as OpenAI sends them: {"role": ...}, {"content": ...},
    # {"tool_calls": [...]} or {}.
    delta: dict[str, str | list[dict[str, Any]]]
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None  # None only on streamed chunks


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "dspark"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
