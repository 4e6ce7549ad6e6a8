"""From a parsed request to a response: validation, prompt ids, sampling parameters, the engine
call, and abort when the client goes away."""

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from engine.async_engine import AsyncLLM
from engine.output_processor import RequestOutput
from scheduler import EngineDead, InvalidRequest, SamplingParams, StructuredOutput
from server.choices import merge_choices
from server.errors import APIError
from server.formats import Plan, ResponseFormat
from server.metrics import Metrics
from server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    GenerationRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from server.reasoning import ReasoningSplitter, opens_in_prompt
from server.streaming import sse_events
from server.tenants import ANONYMOUS, Tenants, guarded
from server.tools import constraint, history_calls, render, tool_plan

logger = logging.getLogger(__name__)

T = TypeVar("T")
# nginx's status for "client closed request"; nobody reads it, but access logs show it.
CLIENT_CLOSED_REQUEST = 499


@dataclass(slots=True)
class ServingContext:
    engine: AsyncLLM
    metrics: Metrics
    model_name: str  # the served name clients must pass as `model`
    max_model_len: int
    reasoning: bool = False  # split think blocks into reasoning_content (server/reasoning.py)
    tenants: Tenants = field(default_factory=Tenants)
    request_timeout: float | None = None


class ClientDisconnected(Exception):
    pass


# ---- building a plan ---------------------------------------------------------------------


MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_CHOICES = 128  # OpenAI's limit for n
MAX_CHAT_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5


async def plan_chat(body: ChatCompletionRequest, ctx: ServingContext) -> Plan:
    _check_common(body, ctx)
    tokenizer = ctx.engine.info.tokenizer
    template = tokenizer.chat_template or ""
    messages = [_render_message(m, i, template) for i, m in enumerate(body.messages)]
    tools = tool_plan(body.tools, body.tool_choice, body.parallel_tool_calls, template)
    template_vars: dict[str, Any] = {}
    if tools is not None:
        if body.logprobs:
            raise InvalidRequest("logprobs together with tools are not supported", "logprobs")
        if tools.choice != "auto" and structured_output(body) is not None:
            raise InvalidRequest("response_format cannot be combined with tool_choice required or a "
                                 "named function", "response_format")
        messages, template_vars = render(tools, messages)
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs set to true", "top_logprobs")
    top = body.top_logprobs or 0
    if not 0 <= top <= MAX_CHAT_TOP_LOGPROBS:
        raise InvalidRequest(f"top_logprobs must be in [0, {MAX_CHAT_TOP_LOGPROBS}], got {top}", "top_logprobs")
    # Off the event loop: a long conversation takes a while to render and tokenise.
    prompt_ids = await asyncio.to_thread(tokenizer.encode_chat, messages, **template_vars)
    plan = _plan(body, ctx, f"chatcmpl-{uuid.uuid4().hex}", prompt_ids, "messages",
                 top if body.logprobs else None)
    if ctx.reasoning:
        inside = opens_in_prompt(tokenizer.decode(prompt_ids[-16:]))
        plan.reasoning = {i: ReasoningSplitter(thinking=inside) for i in range(plan.n)}
    if tools is not None:
        plan.tools = tools
        if (forced := constraint(tools)) is not None:
            plan.params = replace(plan.params, structured=forced)
    return plan


def _render_message(message: ChatMessage, i: int, template: str) -> dict[str, Any]:
    """One message as the chat template takes it. `developer` is OpenAI's new name for
    `system`; without tool support in the template, an assistant's tool calls are written
    into its content as JSON (the documented fallback), tool results render as role `tool`."""
    if isinstance(message.content, list):
        for j, part in enumerate(message.content):
            if part.type != "text" or part.text is None:
                raise InvalidRequest(f"messages[{i}].content[{j}]: {part.type!r} parts are not supported; "
                                     "this model reads text only", "messages")
    if message.role == "user" and not message.content:
        raise InvalidRequest(f"messages[{i}].content must not be empty", "messages")
    if message.role == "tool" and message.content is None:
        raise InvalidRequest(f"messages[{i}]: a tool message needs content", "messages")
    out = message.model_dump(exclude_none=True)
    if message.role == "developer":
        out["role"] = "system"
    if message.tool_calls and "tool_calls" not in template:
        calls = history_calls(message.tool_calls)
        content = out.get("content") or ""
        if isinstance(content, list):  # text parts: the tokenizer joins them with newlines
            out["content"] = [*content, {"type": "text", "text": calls}]
        else:
            out["content"] = f"{content}\n{calls}" if content else calls
        del out["tool_calls"]
    return out


async def plan_completion(body: CompletionRequest, ctx: ServingContext) -> Plan:
    _check_common(body, ctx)
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_COMPLETION_LOGPROBS:
        raise InvalidRequest(f"logprobs must be in [0, {MAX_COMPLETION_LOGPROBS}], got {body.logprobs}", "logprobs")
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):  # a batch
        if len(prompt) > 1:
            raise InvalidRequest("batched prompts are not supported: send one prompt per request",
                                 "prompt")
        prompt = prompt[0]
    tokenizer = ctx.engine.info.tokenizer
    if isinstance(prompt, str):
        # As LLMEngine.tokenize_prompt does for text: a plain prompt gets the model's BOS.
        prompt_ids = await asyncio.to_thread(tokenizer.encode, prompt, True)
    else:
        prompt_ids = list(prompt)  # the engine checks the id range when it admits the request
    if not prompt_ids:
        raise InvalidRequest("the prompt is empty", "prompt")
    plan = _plan(body, ctx, f"cmpl-{uuid.uuid4().hex}", prompt_ids, "prompt", body.logprobs)
    if body.echo:
        plan.echo = prompt if isinstance(prompt, str) else tokenizer.decode(prompt_ids)
        if body.logprobs is not None:  # the echoed prompt's tokens are scored too
            plan.params = replace(plan.params, prompt_logprobs=body.logprobs)
    return plan


async def tokenize(body: TokenizeRequest, ctx: ServingContext) -> TokenizeResponse:
    """vLLM's /tokenize: a prompt's ids, or chat messages' as the chat endpoint renders them."""
    _check_model(body.model, ctx)
    tokenizer = ctx.engine.info.tokenizer
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequest("send exactly one of prompt and messages", "prompt")
    if body.messages is not None:
        messages = [_render_message(m, i, tokenizer.chat_template or "") for i, m in enumerate(body.messages)]
        text = await asyncio.to_thread(tokenizer.apply_chat_template, messages, body.add_generation_prompt)
        ids = await asyncio.to_thread(tokenizer.encode, text, False)
    else:
        ids = await asyncio.to_thread(tokenizer.encode, body.prompt, body.add_special_tokens)
    return TokenizeResponse(count=len(ids), max_model_len=ctx.max_model_len, tokens=ids)


async def detokenize(body: DetokenizeRequest, ctx: ServingContext) -> DetokenizeResponse:
    _check_model(body.model, ctx)
    vocab = ctx.engine.info.tokenizer.vocab_size
    if any(not 0 <= t < vocab for t in body.tokens):
        raise InvalidRequest(f"tokens must be ids in [0, {vocab})", "tokens")
    return DetokenizeResponse(prompt=ctx.engine.info.tokenizer.decode(body.tokens))


def _check_model(model: str | None, ctx: ServingContext) -> None:
    if model is not None and model != ctx.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves "
                       f"{ctx.model_name!r}", "model", "model_not_found")


def _check_common(body: GenerationRequest, ctx: ServingContext) -> None:
    _check_model(body.model, ctx)
    for name, message in body.unsupported().items():
        raise InvalidRequest(message, name)
    if body.n < 1:
        raise InvalidRequest(f"n must be at least 1, got {body.n}", "n")
    if body.n > MAX_CHOICES:
        raise InvalidRequest(f"n must be at most {MAX_CHOICES}, got {body.n}", "n")
    if body.stream_options is not None and not body.stream:
        raise InvalidRequest("stream_options is only allowed when stream is true",
                             "stream_options")
    if isinstance(body.stop, list) and len(body.stop) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(body.stop)}",
                             "stop")


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float]:
    """JSON object keys are strings: token ids written in decimal."""
    out = {}
    for key, bias in (raw or {}).items():
        if not key.isdigit():
            raise InvalidRequest(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
        out[int(key)] = bias
    return out


def resolve_max_tokens(requested: int | None, num_prompt_tokens: int, max_model_len: int,
                       prompt_param: str, default: int | None = None) -> int:
    """The output budget: what was asked for, else `default` capped by the context, else (as
    vLLM's chat) the rest of the context window."""
    remaining = max_model_len - num_prompt_tokens
    if remaining <= 0:
        raise InvalidRequest(
            f"this model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{num_prompt_tokens} tokens; shorten it to at most {max_model_len - 1} tokens",
            prompt_param)
    if requested is None:
        return remaining if default is None else min(default, remaining)
    if requested > remaining:
        raise InvalidRequest(
            f"max_tokens is too large: this model's maximum context length is {max_model_len} "
            f"tokens and the prompt has {num_prompt_tokens}, so at most {remaining} tokens can "
            f"be generated, but {requested} were requested", "max_tokens")
    return requested  # values below 1 are refused by SamplingParams with their own message


def structured_output(body: GenerationRequest) -> StructuredOutput | None:
    """The request's output constraint: OpenAI's response_format or one of vLLM's guided_*."""
    given = [name for name in ("response_format", "guided_json", "guided_regex", "guided_choice")
             if getattr(body, name) is not None]
    if len(given) > 1:
        raise InvalidRequest(f"send only one of {', '.join(given)}", given[1])
    if body.guided_json is not None:
        schema = body.guided_json if isinstance(body.guided_json, str) else json.dumps(body.guided_json)
        return StructuredOutput("json_schema", schema, "guided_json")
    if body.guided_regex is not None:
        return StructuredOutput("regex", body.guided_regex, "guided_regex")
    if body.guided_choice is not None:
        if not body.guided_choice or not all(body.guided_choice):
            raise InvalidRequest("guided_choice must be a list of non-empty strings", "guided_choice")
        return StructuredOutput("choice", json.dumps(body.guided_choice), "guided_choice")
    fmt = body.response_format
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return StructuredOutput("json_object")
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise InvalidRequest("response_format.json_schema must be an object with a 'schema' object",
                                 "response_format")
        # OpenAI's strict mode is what the grammar enforces anyway; no schema means any object
        return StructuredOutput("json_schema", json.dumps(spec.get("schema") or {"type": "object"}))
    raise InvalidRequest(f"response_format type must be text, json_object or json_schema, got {fmt.get('type')!r}",
                         "response_format")


def _prediction(body: GenerationRequest, ctx: ServingContext) -> list[int] | None:
    if body.prediction is None:
        return None
    if isinstance(body.prediction.content, list) and any(p.type != "text" for p in body.prediction.content):
        raise InvalidRequest("prediction.content parts must be text", "prediction")
    return ctx.engine.info.tokenizer.encode(body.prediction.text)


def _plan(body: GenerationRequest, ctx: ServingContext, req_id: str, prompt_ids: list[int],
          prompt_param: str, logprobs: int | None) -> Plan:
    requested = body.requested_max_tokens
    if requested is not None and requested < 1:
        field = body.max_tokens_field
        raise InvalidRequest(f"{field} must be a positive integer, got {requested}", field)
    max_tokens = resolve_max_tokens(requested, len(prompt_ids),
                                    ctx.max_model_len, prompt_param, body.default_max_tokens)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k is None else body.top_k,
        seed=body.seed,
        stop=body.stop,
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        logit_bias=_logit_bias(body.logit_bias),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        min_p=body.min_p or 0.0,
        logprobs=logprobs,
        speculative=body.speculative,
        structured=structured_output(body),
        prediction=_prediction(body, ctx),
    )
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    token_bytes = None if logprobs is None else ctx.engine.info.tokenizer.token_bytes
    return Plan(req_id, ctx.model_name, prompt_ids, params, body.stream, include_usage, token_bytes,
                n=body.n, cache_salt=body.cache_salt)


# ---- running it --------------------------------------------------------------------------


async def respond(request: Request, plan: Plan, fmt: ResponseFormat,
                  ctx: ServingContext) -> Response:
    first_id = plan.choice_id(0)
    # generators: nothing reaches the engine (or can fail) before the first iteration below
    streams = [ctx.metrics.track(ctx.engine.generate(
        plan.prompt_ids, plan.choice_params(i), plan.choice_id(i), plan.arrival_time,
        prompt_parent=first_id if i else None, cache_salt=plan.cache_salt)) for i in range(plan.n)]
    lease = ctx.tenants.admit(getattr(request.state, "tenant", ANONYMOUS), len(plan.prompt_ids) * plan.n)
    outputs = guarded(merge_choices(streams), lease, ctx.request_timeout)
    streaming = False
    try:
        if plan.stream:
            # Wait for the first output before sending headers, so a refusal (full queue, bad
            # token ids) is still a proper HTTP error.
            first = await until_disconnected(request, anext(outputs))
            response = ClosingStreamingResponse(sse_events(plan, fmt, first, outputs),
                                                media_type="text/event-stream",
                                                headers={"Cache-Control": "no-cache"})
            streaming = True  # the stream owns `outputs` (and so the lease) from here
            return response
        finals = await until_disconnected(request, _finals(outputs, plan.n))
        return Response(fmt.complete(plan, finals).model_dump_json(),
                        media_type="application/json")
    except ClientDisconnected:
        logger.info("client left before %s finished; aborted", plan.req_id)
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        if not streaming:
            await outputs.aclose()  # no-op when finished; otherwise aborts the requests
            lease.release(0, ran=False)  # no-op when the outputs ran: they charged what they used


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body when the response ends however it ends. Starlette leaves a generator
    paused at a `yield` when a send fails (client gone, stalled), and only garbage collection
    would then abort the requests and free their slot and KV."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


async def _finals(outputs: AsyncIterator[tuple[int, RequestOutput]], n: int) -> list[RequestOutput]:
    finals: dict[int, RequestOutput] = {}
    async for index, out in outputs:
        if out.finished:
            finals[index] = out
            if len(finals) == n:
                return [finals[i] for i in range(n)]
    raise EngineDead("the request was aborted")


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, but cancel it (and so abort its request) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientDisconnected
    return task.result()


async def _wait_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
