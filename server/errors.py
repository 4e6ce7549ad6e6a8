"""Every error leaves the server in OpenAI's shape: {"error": {message, type, param, code}}.

The engine's error classes map to statuses here (InvalidRequest 400, CapacityExceeded 503 with
Retry-After, EngineDead 503, RequestFailed 500, DeadlineExceeded 504); body validation errors
are 400 (never FastAPI's 422); unknown routes 404; anything unexpected a 500 without a
traceback in the body.
"""

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from scheduler import CapacityExceeded, DeadlineExceeded, EngineDead, InvalidRequest, RequestFailed
from server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "service_unavailable_error", 504: "timeout_error"}
MAX_REPORTED_ERRORS = 3


class APIError(Exception):
    """An error with its HTTP status, raised by the server's own checks."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=_TYPES.get(status, "error"),
                                         param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def describe_validation_errors(errors: Sequence[Any]) -> tuple[str, str | None]:
    """A readable message and the first offending parameter, from pydantic's error list."""
    if not errors:
        return "invalid request body", None
    if errors[0]["type"] == "json_invalid":
        return f"the request body is not valid JSON: {errors[0]['msg']}", None
    parts = []
    for err in errors[:MAX_REPORTED_ERRORS]:
        loc = ".".join(str(p) for p in err["loc"] if p != "body")
        parts.append(f"{loc or 'body'}: {err['msg']}")
    more = len(errors) - MAX_REPORTED_ERRORS
    message = "invalid request: " + "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
    # `param` names the top-level field, as OpenAI does; the full path is in the message
    # (deeper parts of pydantic's path include union member names such as 'list[int]').
    top = [p for p in errors[0]["loc"] if p != "body"]
    return message, str(top[0]) if top else None


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    async def invalid_request(_: Request, exc: InvalidRequest) -> JSONResponse:
        return error_response(400, str(exc), exc.param)

    async def capacity(_: Request, exc: CapacityExceeded) -> JSONResponse:
        # the server is overloaded, not the client over a quota (that is a 429): retry soon,
        # here or (behind a router) on another replica
        return error_response(503, str(exc), code="queue_full", headers={"Retry-After": "1"})

    async def engine_dead(_: Request, exc: EngineDead) -> JSONResponse:
        return error_response(503, str(exc), code="unavailable")

    async def request_failed(_: Request, exc: RequestFailed) -> JSONResponse:
        return error_response(500, str(exc), code="request_failed")

    async def deadline(_: Request, exc: DeadlineExceeded) -> JSONResponse:
        return error_response(504, str(exc), code="timeout")

    async def validation(_: Request, exc: ValidationError | RequestValidationError) -> JSONResponse:
        message, param = describe_validation_errors(exc.errors())
        return error_response(400, message, param)

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, message, headers=exc.headers)

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal server error")

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(InvalidRequest, invalid_request)
    app.add_exception_handler(CapacityExceeded, capacity)
    app.add_exception_handler(EngineDead, engine_dead)
    app.add_exception_handler(RequestFailed, request_failed)
    app.add_exception_handler(DeadlineExceeded, deadline)
    app.add_exception_handler(ValidationError, validation)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
