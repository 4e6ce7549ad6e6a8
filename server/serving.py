"""From a parsed request to a response: validation, prompt ids, sampling parameters, the engine
call, and abort when the client goes away."""

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import suppress
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from engine.async_engine import AsyncLLM
from engine.output_processor import RequestOutput
from scheduler import EngineDead, InvalidRequest, SamplingParams
from server.errors import APIError
from server.formats import Plan, ResponseFormat
from server.metrics import Metrics
from server.protocol import ChatCompletionRequest, CompletionRequest, GenerationRequest
from server.streaming import sse_events

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


class ClientDisconnected(Exception):
    pass


# ---- building a plan ---------------------------------------------------------------------


async def plan_chat(body: ChatCompletionRequest, ctx: ServingContext) -> Plan:
    _check_common(body, ctx)
    for i, message in enumerate(body.messages):
        if message.role == "user" and not message.content:
            raise InvalidRequest(f"messages[{i}].content must not be empty", "messages")
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    # Off the event loop: a long conversation takes a while to render and tokenise.
    prompt_ids = await asyncio.to_thread(ctx.engine.info.tokenizer.encode_chat, messages)
    return _plan(body, ctx, f"chatcmpl-{uuid.uuid4().hex}", prompt_ids, "messages")


async def plan_completion(body: CompletionRequest, ctx: ServingContext) -> Plan:
    _check_common(body, ctx)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):  # a batch
        if len(prompt) > 1:
            raise InvalidRequest("batched prompts are not supported: send one prompt per request",
                                 "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        # As LLMEngine.tokenize_prompt does for text: a plain prompt gets the model's BOS.
        tokenizer = ctx.engine.info.tokenizer
        prompt_ids = await asyncio.to_thread(tokenizer.encode, prompt, True)
    else:
        prompt_ids = list(prompt)  # the engine checks the id range when it admits the request
    if not prompt_ids:
        raise InvalidRequest("the prompt is empty", "prompt")
    return _plan(body, ctx, f"cmpl-{uuid.uuid4().hex}", prompt_ids, "prompt")


def _check_common(body: GenerationRequest, ctx: ServingContext) -> None:
    if body.model is not None and body.model != ctx.model_name:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves "
                       f"{ctx.model_name!r}", "model", "model_not_found")
    if body.n < 1:
        raise InvalidRequest(f"n must be at least 1, got {body.n}", "n")
    if body.n > 1:
        raise InvalidRequest("n > 1 is not supported yet: send n separate requests (with "
                             "different seeds)", "n")
    if body.stream_options is not None and not body.stream:
        raise InvalidRequest("stream_options is only allowed when stream is true",
                             "stream_options")


def resolve_max_tokens(requested: int | None, num_prompt_tokens: int, max_model_len: int,
                       prompt_param: str) -> int:
    """The output budget: what was asked for, or (as vLLM) the rest of the context window."""
    remaining = max_model_len - num_prompt_tokens
    if remaining <= 0:
        raise InvalidRequest(
            f"this model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{num_prompt_tokens} tokens; shorten it to at most {max_model_len - 1} tokens",
            prompt_param)
    if requested is None:
        return remaining
    if requested > remaining:
        raise InvalidRequest(
            f"max_tokens is too large: this model's maximum context length is {max_model_len} "
            f"tokens and the prompt has {num_prompt_tokens}, so at most {remaining} tokens can "
            f"be generated, but {requested} were requested", "max_tokens")
    return requested  # values below 1 are refused by SamplingParams with their own message


def _plan(body: GenerationRequest, ctx: ServingContext, req_id: str, prompt_ids: list[int],
          prompt_param: str) -> Plan:
    max_tokens = resolve_max_tokens(body.requested_max_tokens, len(prompt_ids),
                                    ctx.max_model_len, prompt_param)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k is None else body.top_k,
        seed=body.seed,
        stop=body.stop,
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
    )
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return Plan(req_id, ctx.model_name, prompt_ids, params, body.stream, include_usage)


# ---- running it --------------------------------------------------------------------------


async def respond(request: Request, plan: Plan, fmt: ResponseFormat,
                  ctx: ServingContext) -> Response:
    outputs = ctx.metrics.track(
        ctx.engine.generate(plan.prompt_ids, plan.params, plan.req_id, plan.arrival_time))
    try:
        if plan.stream:
            # Wait for the first output before sending headers, so a refusal (full queue, bad
            # token ids) is still a proper HTTP error.
            first = await until_disconnected(request, anext(outputs))
            return StreamingResponse(sse_events(plan, fmt, first, outputs),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        final = await until_disconnected(request, _last(outputs))
        return Response(fmt.complete(plan, final).model_dump_json(),
                        media_type="application/json")
    except ClientDisconnected:
        logger.info("client left before %s finished; aborted", plan.req_id)
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        if not plan.stream:
            await outputs.aclose()  # no-op when finished; otherwise aborts the request


async def _last(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    async for out in outputs:
        if out.finished:
            return out
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
