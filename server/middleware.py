"""ASGI middleware: a request body size and time limit (413, 408), enforced while the body
streams in, dropping clients that stop reading, the count of error responses for the metrics,
and request ids."""

import asyncio
import logging
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_response
from server.metrics import Metrics

stalled_logger = logging.getLogger("server.clients")

# An over-limit body is still read (and dropped) up to this multiple of the limit before the 413
# goes out: a client that is still uploading when the server answers and closes often sees a
# reset connection instead of the 413. Beyond it the upload is cut off.
_DRAIN_FACTOR = 16


class BodySizeLimitMiddleware:
    """Reads the whole body first: bounded in size (413) and in time (408, so a client that
    trickles its body in cannot hold a connection and a task for ever)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Read the whole body here, so chunked uploads (no Content-Length) are bounded too.
        chunks: list[bytes] = []
        size, more = 0, True
        try:
            async with asyncio.timeout(self.timeout):
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client left before sending its body: nobody to answer
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    more = message.get("more_body", False)
                    if size <= self.max_bytes:
                        chunks.append(chunk)
                    elif size > _DRAIN_FACTOR * self.max_bytes:
                        break
        except TimeoutError:
            if size > self.max_bytes:  # too large anyway: say so rather than too slow
                response = error_response(413, f"the request body is larger than the limit of "
                                          f"{self.max_bytes} bytes", code="request_too_large",
                                          headers={"Connection": "close"})
                await response(scope, receive, send)
                return
            response = error_response(408, f"the request body did not arrive within {self.timeout:g} s",
                                      code="request_timeout", headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        if size > self.max_bytes:
            response = error_response(
                413, f"the request body is larger than the limit of {self.max_bytes} bytes",
                code="request_too_large", headers={"Connection": "close"} if more else None)
            await response(scope, receive, send)
            return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: waits for http.disconnect

        await self.app(scope, replay, send)


class _ClientStalled(Exception):
    pass


def _only_stalls(e: BaseException) -> bool:
    """The stall itself, or an exception group (starlette's task groups) of nothing else."""
    if isinstance(e, BaseExceptionGroup):
        return all(_only_stalls(inner) for inner in e.exceptions)
    return isinstance(e, _ClientStalled)


class StalledClientMiddleware:
    """Drops a client that takes no response bytes for `timeout` s (it stopped reading a
    stream): the send gives up, the response ends and its request is aborted, freeing its KV,
    instead of the stream waiting on a full socket for ever."""

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        stalled = False

        async def timed_send(message: Message) -> None:
            nonlocal stalled
            try:
                async with asyncio.timeout(self.timeout):
                    await send(message)
            except TimeoutError:
                stalled = True
                raise _ClientStalled from None

        try:
            await self.app(scope, receive, timed_send)
        except BaseException as e:
            if not (stalled and _only_stalls(e)):
                raise
            stalled_logger.warning("%s %s: the client read nothing for %g s; dropped it",
                                   scope["method"], scope["path"], self.timeout)


class ErrorCountingMiddleware:
    """Counts responses with an HTTP error status in `dspark:request_errors`."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.count_error(message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


logger = logging.getLogger("server.requests")
# a client's id is echoed when it is a plain token; anything else gets a fresh one
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestIdMiddleware:
    """Echo the client's `X-Request-Id` (or a new one) on the response and log it with the
    method, path and status: one line per request, never its prompt or output."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = sent if _CLIENT_ID.fullmatch(sent) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                logger.info("%s %s %s -> %d", request_id, scope["method"], scope["path"], message["status"])
            await send(message)

        await self.app(scope, receive, send_with_id)
