"""How one generation is written back: chat completion vs text completion, whole or in chunks.

Both endpoints share the generation and streaming code; only these builders differ.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
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
    CompletionTokensDetails,
    PromptTokensDetails,
    SpeculativeUsage,
    TopLogprob,
    Usage,
)
from server.reasoning import ReasoningSplitter
from server.tools import ToolPlan, parse


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
    n: int = 1  # choices, each its own engine request (see `choice_params`)
    cache_salt: str | None = None  # prefix-cache blocks are shared only under the same salt
    # a stream's running text_offset of completions logprobs per choice (streamed tokens' length)
    logprob_offsets: dict[int, int] = field(default_factory=dict)
    tools: ToolPlan | None = None  # chat with tools: replies are parsed for calls
    # models that think: each choice's reply split into reasoning_content and content
    reasoning: dict[int, ReasoningSplitter] | None = None
    # with tools, a stream holds a choice's text while it may still be a call (choice -> text);
    # choices found to be plain content stream on (`streaming_content`)
    held: dict[int, str] = field(default_factory=dict)
    streaming_content: set[int] = field(default_factory=set)
    arrival_time: float = field(default_factory=time.monotonic)
    created: int = field(default_factory=lambda: int(time.time()))

    def choice_id(self, index: int) -> str:
        """The engine request of choice `index`."""
        return self.req_id if self.n == 1 else f"{self.req_id}-{index}"

    def choice_params(self, index: int) -> SamplingParams:
        """Choice i samples with seed + i (the first with the request's seed), so a seeded
        n-choice request reproduces n single requests of those seeds."""
        if self.params.seed is None or index == 0:
            return self.params
        return replace(self.params, seed=(self.params.seed + index) % 2**63)


def usage_of(plan: Plan, outs: list[RequestOutput]) -> Usage:
    """One request's usage over its choices: the prompt once (OpenAI counts it so), every
    choice's completion tokens, and speculation (and the prediction's part in it) summed over
    the choices."""
    rounds = sum(o.num_spec_rounds for o in outs)
    accepted = sum(o.num_accepted_tokens for o in outs)
    spec = None
    if rounds:
        spec = SpeculativeUsage(rounds=rounds, draft_tokens=sum(o.num_draft_tokens for o in outs),
                                accepted_tokens=accepted, mean_acceptance_length=(accepted + rounds) / rounds)
    prompt, completion = outs[0].num_prompt_tokens, sum(len(o.token_ids) for o in outs)
    details = None
    if plan.params.prediction is not None:
        details = CompletionTokensDetails(
            accepted_prediction_tokens=sum(o.num_prediction_accepted_tokens for o in outs),
            rejected_prediction_tokens=sum(o.num_prediction_rejected_tokens for o in outs))
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=outs[0].num_cached_tokens),
                 completion_tokens_details=details, speculative_decoding=spec)


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


def completion_logprobs(plan: Plan, logprobs: list[TokenLogprob] | None, text_offset: int,
                        out: RequestOutput | None = None) -> CompletionLogprobs | None:
    """OpenAI's legacy completions shape; `text_offset` is where the first token's text starts
    (each token's offset adds the lengths of the token texts before it). With `out`, an echoed
    prompt's tokens come first (the very first has no logprob: nothing predicts it)."""
    if logprobs is None:
        return None
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    if out is not None and out.prompt_logprobs is not None:
        for token_id, lp in zip(out.prompt_token_ids, out.prompt_logprobs):
            text = _token(plan, token_id)[0]
            tokens.append(text)
            values.append(None if lp is None else lp.logprob)
            tops.append(None if lp is None else {_token(plan, t)[0]: v for t, v in lp.top})
            offsets.append(text_offset)
            text_offset += len(text)
    for lp in logprobs:
        text = _token(plan, lp.token_id)[0]
        tokens.append(text)
        values.append(lp.logprob)
        tops.append({_token(plan, t)[0]: v for t, v in lp.top})
        offsets.append(text_offset)
        text_offset += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)


class ResponseFormat(Protocol):
    """Builders of one response; `index` is the choice (0 .. n - 1)."""

    def opening(self, plan: Plan, index: int) -> BaseModel | None:
        """The chunk sent before any text of a choice, if the format has one."""

    def delta(self, plan: Plan, out: RequestOutput, index: int) -> BaseModel | None:
        """The chunk of what `out` added: its text delta and, if asked for, its tokens' logprobs
        (None: nothing to send yet)."""

    def finish(self, plan: Plan, finish_reason: str | None, index: int) -> list[BaseModel]:
        """The chunks that end a choice (with tools: the held calls, then the finish)."""

    def usage(self, plan: Plan, usage: Usage) -> BaseModel: ...

    def complete(self, plan: Plan, outs: list[RequestOutput]) -> BaseModel: ...


class ChatFormat:
    def _chunk(self, plan: Plan, choices: list[ChatChunkChoice],
               usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=plan.req_id, created=plan.created, model=plan.model,
                                   choices=choices, usage=usage)

    def opening(self, plan: Plan, index: int) -> BaseModel:
        return self._chunk(plan, [ChatChunkChoice(index=index, delta={"role": "assistant", "content": ""})])

    def delta(self, plan: Plan, out: RequestOutput, index: int) -> BaseModel | None:
        delta: dict[str, str | list[dict]] = {}
        text = out.delta_text
        if plan.reasoning is not None:
            thought, text = plan.reasoning[index].feed(text)
            if thought:
                delta["reasoning_content"] = thought
        if plan.tools is not None and index not in plan.streaming_content:
            held = plan.held.get(index, "") + text
            start = held.lstrip()
            opener = plan.tools.call_opener
            if not start or opener.startswith(start) or start.startswith(opener):
                plan.held[index] = held  # may still be a call: decided at the finish
                return self._chunk(plan, [ChatChunkChoice(index=index, delta=delta)]) if delta else None
            plan.streaming_content.add(index)  # plain content: what was held, then the rest
            plan.held.pop(index, None)
            text = held
        if text or not delta:
            delta["content"] = text
        return self._chunk(plan, [ChatChunkChoice(index=index, delta=delta,
                                                  logprobs=chat_logprobs(plan, out.delta_logprobs))])

    def finish(self, plan: Plan, finish_reason: str | None, index: int) -> list[BaseModel]:
        chunks = []
        if plan.reasoning is not None:
            thought, rest = plan.reasoning[index].flush()
            if thought:
                chunks.append(self._chunk(plan, [ChatChunkChoice(index=index, delta={"reasoning_content": thought})]))
            if rest and plan.tools is not None and index not in plan.streaming_content:
                plan.held[index] = plan.held.get(index, "") + rest
            elif rest:
                chunks.append(self._chunk(plan, [ChatChunkChoice(index=index, delta={"content": rest})]))
        if plan.tools is not None and index in plan.held:
            content, calls = parse(plan.tools, plan.held.pop(index))
            delta: dict = {"content": content} if content else {}
            if calls:
                delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(calls)]
                finish_reason = "tool_calls"
            if delta:
                chunks.append(self._chunk(plan, [ChatChunkChoice(index=index, delta=delta)]))
        chunks.append(self._chunk(plan, [ChatChunkChoice(index=index, delta={}, finish_reason=finish_reason)]))
        return chunks

    def usage(self, plan: Plan, usage: Usage) -> BaseModel:
        return self._chunk(plan, [], usage)

    def complete(self, plan: Plan, outs: list[RequestOutput]) -> BaseModel:
        choices = []
        for i, out in enumerate(outs):
            thought, text = (None, out.text) if plan.reasoning is None else plan.reasoning[i].split(out.text)
            content, calls = (text, []) if plan.tools is None else parse(plan.tools, text)
            message = AssistantMessage(content=content, reasoning_content=thought, tool_calls=calls or None)
            choices.append(ChatChoice(index=i, message=message,
                                      logprobs=chat_logprobs(plan, out.logprobs),
                                      finish_reason="tool_calls" if calls else out.finish_reason))
        return ChatCompletionResponse(id=plan.req_id, created=plan.created, model=plan.model,
                                      choices=choices, usage=usage_of(plan, outs))


class CompletionFormat:
    def _chunk(self, plan: Plan, choices: list[CompletionChoice],
               usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=plan.req_id, created=plan.created, model=plan.model,
                                  choices=choices, usage=usage)

    def opening(self, plan: Plan, index: int) -> BaseModel | None:
        if not plan.echo or plan.params.prompt_logprobs is not None:
            return None  # scored prompts are echoed with their logprobs, in the first delta
        return self._chunk(plan, [CompletionChoice(index=index, text=plan.echo)])

    def delta(self, plan: Plan, out: RequestOutput, index: int) -> BaseModel:
        # offsets count from the start of the choice's text (echoed prompt included); a scored
        # prompt is echoed with its tokens' logprobs in the choice's first delta
        echo_scored = plan.params.prompt_logprobs is not None and index not in plan.logprob_offsets
        start = 0 if echo_scored else plan.logprob_offsets.get(index, len(plan.echo))
        logprobs = completion_logprobs(plan, out.delta_logprobs, start, out if echo_scored else None)
        if logprobs is not None:
            plan.logprob_offsets[index] = start + sum(map(len, logprobs.tokens))
        text = plan.echo + out.delta_text if echo_scored else out.delta_text
        return self._chunk(plan, [CompletionChoice(index=index, text=text, logprobs=logprobs)])

    def finish(self, plan: Plan, finish_reason: str | None, index: int) -> list[BaseModel]:
        return [self._chunk(plan, [CompletionChoice(index=index, text="", finish_reason=finish_reason)])]

    def usage(self, plan: Plan, usage: Usage) -> BaseModel:
        return self._chunk(plan, [], usage)

    def complete(self, plan: Plan, outs: list[RequestOutput]) -> BaseModel:
        scored = plan.params.prompt_logprobs is not None
        choices = [CompletionChoice(index=i, text=plan.echo + out.text, finish_reason=out.finish_reason,
                                    logprobs=completion_logprobs(plan, out.logprobs, 0 if scored else len(plan.echo),
                                                                 out if scored else None))
                   for i, out in enumerate(outs)]
        return self._chunk(plan, choices, usage_of(plan, outs))
