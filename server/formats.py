"""How one generation is written back: chat completion vs text completion, whole or in chunks.

Both endpoints share the generation and streaming code; only these builders differ.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel

from engine.output_processor import RequestOutput
from scheduler import SamplingParams, TokenLogprob
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    SpeculativeUsage,
    TopLogprob,
    Usage,
)


@dataclass(slots=True)
class Plan:
    """One validated request, ready for the engine."""

    req_id: str
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    # token id -> the bytes it stands for; set when the request asked for logprobs
    token_bytes: Callable[[int], bytes] | None = None
    echo: str = ""  # completions' echo: the prompt text, written before the output
    # a stream's running text_offset of completions logprobs (the streamed tokens' length)
    logprob_offset: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    created: int = field(default_factory=lambda: int(time.time()))


def usage_of(out: RequestOutput) -> Usage:
    spec = None
    if out.num_spec_rounds:
        spec = SpeculativeUsage(
            rounds=out.num_spec_rounds, draft_tokens=out.num_draft_tokens,
            accepted_tokens=out.num_accepted_tokens,
            mean_acceptance_length=(out.num_accepted_tokens + out.num_spec_rounds) / out.num_spec_rounds)
    return Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=len(out.token_ids),
                 total_tokens=out.num_prompt_tokens + len(out.token_ids), speculative_decoding=spec)


def _token(plan: Plan, token_id: int) -> tuple[str, bytes]:
    assert plan.token_bytes is not None
    raw = plan.token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), raw


def chat_logprobs(plan: Plan, logprobs: list[TokenLogprob] | None) -> ChatLogprobs | None:
    """OpenAI's chat shape: per token its text, logprob, UTF-8 bytes and top alternatives."""
    if logprobs is None:
        return None
    content = []
    for lp in logprobs:
        text, raw = _token(plan, lp.token_id)
        top = []
        for token_id, value in lp.top:
            t, b = _token(plan, token_id)
            top.append(TopLogprob(token=t, logprob=value, bytes=list(b)))
        content.append(ChatTokenLogprob(token=text, logprob=lp.logprob, bytes=list(raw), top_logprobs=top))
    return ChatLogprobs(content=content)


def completion_logprobs(plan: Plan, logprobs: list[TokenLogprob] | None,
                        text_offset: int) -> CompletionLogprobs | None:
    """OpenAI's legacy completions shape; `text_offset` is where the first token's text starts
    (each token's offset adds the lengths of the token texts before it)."""
    if logprobs is None:
        return None
    tokens, values, tops, offsets = [], [], [], []
    for lp in logprobs:
        text = _token(plan, lp.token_id)[0]
        tokens.append(text)
        values.append(lp.logprob)
        tops.append({_token(plan, t)[0]: v for t, v in lp.top})
        offsets.append(text_offset)
        text_offset += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)


class ResponseFormat(Protocol):
    def opening(self, plan: Plan) -> BaseModel | None:
        """The chunk sent before any text, if the format has one."""

    def delta(self, plan: Plan, out: RequestOutput) -> BaseModel:
        """The chunk of what `out` added: its text delta and, if asked for, its tokens' logprobs."""

    def finish(self, plan: Plan, finish_reason: str | None) -> BaseModel: ...

    def usage(self, plan: Plan, usage: Usage) -> BaseModel: ...

    def complete(self, plan: Plan, out: RequestOutput) -> BaseModel: ...


class ChatFormat:
    def _chunk(self, plan: Plan, choices: list[ChatChunkChoice],
               usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=plan.req_id, created=plan.created, model=plan.model,
                                   choices=choices, usage=usage)

    def opening(self, plan: Plan) -> BaseModel:
        return self._chunk(plan, [ChatChunkChoice(delta={"role": "assistant", "content": ""})])

    def delta(self, plan: Plan, out: RequestOutput) -> BaseModel:
        return self._chunk(plan, [ChatChunkChoice(delta={"content": out.delta_text},
                                                  logprobs=chat_logprobs(plan, out.delta_logprobs))])

    def finish(self, plan: Plan, finish_reason: str | None) -> BaseModel:
        return self._chunk(plan, [ChatChunkChoice(delta={}, finish_reason=finish_reason)])

    def usage(self, plan: Plan, usage: Usage) -> BaseModel:
        return self._chunk(plan, [], usage)

    def complete(self, plan: Plan, out: RequestOutput) -> BaseModel:
        choice = ChatChoice(message=AssistantMessage(content=out.text),
                            logprobs=chat_logprobs(plan, out.logprobs), finish_reason=out.finish_reason)
        return ChatCompletionResponse(id=plan.req_id, created=plan.created, model=plan.model,
                                      choices=[choice], usage=usage_of(out))


class CompletionFormat:
    def _chunk(self, plan: Plan, choices: list[CompletionChoice],
               usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=plan.req_id, created=plan.created, model=plan.model,
                                  choices=choices, usage=usage)

    def opening(self, plan: Plan) -> BaseModel | None:
        return self._chunk(plan, [CompletionChoice(text=plan.echo)]) if plan.echo else None

    def delta(self, plan: Plan, out: RequestOutput) -> BaseModel:
        # offsets count from the start of the choice's text (echoed prompt included)
        logprobs = completion_logprobs(plan, out.delta_logprobs, len(plan.echo) + plan.logprob_offset)
        if logprobs is not None:
            plan.logprob_offset += sum(map(len, logprobs.tokens))
        return self._chunk(plan, [CompletionChoice(text=out.delta_text, logprobs=logprobs)])

    def finish(self, plan: Plan, finish_reason: str | None) -> BaseModel:
        return self._chunk(plan, [CompletionChoice(text="", finish_reason=finish_reason)])

    def usage(self, plan: Plan, usage: Usage) -> BaseModel:
        return self._chunk(plan, [], usage)

    def complete(self, plan: Plan, out: RequestOutput) -> BaseModel:
        logprobs = completion_logprobs(plan, out.logprobs, len(plan.echo))
        choice = CompletionChoice(text=plan.echo + out.text, logprobs=logprobs, finish_reason=out.finish_reason)
        return self._chunk(plan, [choice], usage_of(out))
