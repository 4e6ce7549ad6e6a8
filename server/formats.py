"""How one generation is written back: chat completion vs text completion, whole or in chunks.

Both endpoints share the generation and streaming code; only these builders differ.
"""

import time
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel

from engine.output_processor import RequestOutput
from scheduler import SamplingParams
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
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
    arrival_time: float = field(default_factory=time.monotonic)
    created: int = field(default_factory=lambda: int(time.time()))


def usage_of(out: RequestOutput) -> Usage:
    return Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=len(out.token_ids),
                 total_tokens=out.num_prompt_tokens + len(out.token_ids))


class ResponseFormat(Protocol):
    def opening(self, plan: Plan) -> BaseModel | None:
        """The chunk sent before any text, if the format has one."""

    def delta(self, plan: Plan, text: str) -> BaseModel: ...

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

    def delta(self, plan: Plan, text: str) -> BaseModel:
        return self._chunk(plan, [ChatChunkChoice(delta={"content": text})])

    def finish(self, plan: Plan, finish_reason: str | None) -> BaseModel:
        return self._chunk(plan, [ChatChunkChoice(delta={}, finish_reason=finish_reason)])

    def usage(self, plan: Plan, usage: Usage) -> BaseModel:
        return self._chunk(plan, [], usage)

    def complete(self, plan: Plan, out: RequestOutput) -> BaseModel:
        choice = ChatChoice(message=AssistantMessage(content=out.text),
                            finish_reason=out.finish_reason)
        return ChatCompletionResponse(id=plan.req_id, created=plan.created, model=plan.model,
                                      choices=[choice], usage=usage_of(out))


class CompletionFormat:
    def _chunk(self, plan: Plan, choices: list[CompletionChoice],
               usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=plan.req_id, created=plan.created, model=plan.model,
                                  choices=choices, usage=usage)

    def opening(self, plan: Plan) -> BaseModel | None:
        return None

    def delta(self, plan: Plan, text: str) -> BaseModel:
        return self._chunk(plan, [CompletionChoice(text=text)])

    def finish(self, plan: Plan, finish_reason: str | None) -> BaseModel:
        return self._chunk(plan, [CompletionChoice(text="", finish_reason=finish_reason)])

    def usage(self, plan: Plan, usage: Usage) -> BaseModel:
        return self._chunk(plan, [], usage)

    def complete(self, plan: Plan, out: RequestOutput) -> BaseModel:
        return self._chunk(plan, [CompletionChoice(text=out.text, finish_reason=out.finish_reason)],
                           usage_of(out))
