"""Server-sent events as vLLM and OpenAI send them.

Chat: a role chunk, content chunks, a chunk with only the finish reason, a usage chunk when
`stream_options.include_usage`, then `data: [DONE]`. Completions: the same without the role.
"""

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

from pydantic import BaseModel

from engine.output_processor import RequestOutput
from scheduler import DSparkError, EngineDead
from server.formats import Plan, ResponseFormat, usage_of
from server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


def sse(body: BaseModel) -> str:
    return f"data: {body.model_dump_json()}\n\n"


async def sse_events(plan: Plan, fmt: ResponseFormat, first: tuple[int, RequestOutput],
                     outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
    """Events of one stream over its choices. `first` was awaited before the response started
    (so refusals are plain HTTP errors); `outputs` yields the rest. When the client
    disconnects, starlette cancels this generator, and closing `outputs` aborts the requests."""
    async with aclosing(outputs):
        try:
            for index in range(plan.n):
                if (opening := fmt.opening(plan, index)) is not None:
                    yield sse(opening)
            finals: dict[int, RequestOutput] = {}
            item: tuple[int, RequestOutput] | None = first
            while True:
                if item is None:
                    raise EngineDead("the request was aborted")
                index, out = item
                if (out.delta_text or out.delta_logprobs) and (chunk := fmt.delta(plan, out, index)):
                    yield sse(chunk)
                if out.finished:
                    for chunk in fmt.finish(plan, out.finish_reason, index):
                        yield sse(chunk)
                    finals[index] = out
                    if len(finals) == plan.n:
                        if plan.include_usage:
                            yield sse(fmt.usage(plan, usage_of(plan, [finals[i] for i in range(plan.n)])))
                        break
                item = await anext(outputs, None)
        except DSparkError as e:
            # The status line is gone already; tell the client in-band, as vLLM does.
            logger.warning("stream %s ended early: %s", plan.req_id, e)
            yield sse(ErrorResponse(error=ErrorInfo(message=str(e), type="server_error")))
        yield DONE
