"""The FastAPI app: factory, lifespan (load in the background, drain on shutdown) and routes."""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from engine.async_engine import AsyncLLM
from server import openapi
from server.config import ServerConfig
from server.errors import APIError, install_error_handlers
from server.formats import ChatFormat, CompletionFormat
from server.metrics import Metrics
from server.middleware import (
    BodySizeLimitMiddleware,
    ErrorCountingMiddleware,
    RequestIdMiddleware,
    StalledClientMiddleware,
)
from server.openapi import request_body
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from server.reasoning import enabled
from server.serving import ServingContext, detokenize, plan_chat, plan_completion, respond, tokenize
from server.tenants import Tenants

logger = logging.getLogger(__name__)

B = TypeVar("B", bound=BaseModel)
CHAT_PAGE = Path(__file__).with_name("static") / "chat.html"
CHAT, COMPLETION = ChatFormat(), CompletionFormat()


@dataclass(slots=True)
class ServerState:
    config: ServerConfig
    engine: AsyncLLM
    metrics: Metrics
    serving: ServingContext | None = None  # set once the model is loaded
    load_error: BaseException | None = None
    draining: bool = False
    tenants: Tenants = field(default_factory=Tenants)
    # Called when the server cannot ever serve (the model failed to load, the engine died),
    # e.g. to exit so that a supervisor restarts it.
    on_fatal: Callable[[], None] | None = None
    engine_failed: bool = False

    def start_draining(self) -> None:
        if not self.draining:
            logger.info("draining: refusing new requests, finishing %d running",
                        self.engine.num_in_flight)
        self.draining = True

    def ready(self) -> ServingContext:
        """The serving context, or the 503 that explains why there is none."""
        if self.draining:
            raise APIError(503, "the server is shutting down", code="draining")
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}", code="load_failed")
        if self.engine.is_dead:
            raise APIError(503, f"the engine is not running: {self.engine.error}",
                           code="engine_dead")
        if self.serving is None:
            raise APIError(503, "the model is still loading; retry shortly", code="loading",
                           headers={"Retry-After": "5"})
        return self.serving

    def engine_died(self, error: BaseException) -> None:
        logger.critical("%s; every in-flight request was failed; exiting so that the supervisor "
                        "restarts the server", error)
        self.engine_failed = True
        if self.on_fatal is not None:
            self.on_fatal()

    async def finish_loading(self) -> None:
        try:
            info = await self.engine.wait_loaded()
        except Exception as e:  # noqa: BLE001 - any load failure is reported the same way
            self.load_error = e
            logger.error("the model failed to load: %s", e)
            if self.on_fatal is not None:
                self.on_fatal()
            return
        name = self.config.served_model_name or info.model_name
        self.metrics.bind_model(name)
        reasoning = enabled(self.config.reasoning_parser, info.tokenizer.chat_template)
        self.serving = ServingContext(self.engine, self.metrics, name, info.max_model_len, reasoning,
                                      self.tenants, self.config.request_timeout)
        logger.info("ready: serving model %r on %s (%s), max_model_len %d", name, info.device,
                    info.dtype, info.max_model_len)


def _state(request: Request) -> ServerState:
    return request.app.state.server


# Dependencies are async so FastAPI runs them on the event loop, not in its thread pool.
async def _serving(request: Request) -> ServingContext:
    return _state(request).ready()


Serving = Annotated[ServingContext, Depends(_serving)]


async def _check_api_key(request: Request) -> None:
    request.state.tenant = _state(request).tenants.authenticate(request.headers.get("authorization", ""))


async def _parse(request: Request, model: type[B]) -> B:
    # Parsed here rather than by FastAPI so a body is JSON whatever its Content-Type (curl -d
    # sends form encoding by default) and all errors come out in one shape.
    return model.model_validate_json(await request.body())


def create_app(config: ServerConfig, engine: AsyncLLM | None = None,
               on_fatal: Callable[[], None] | None = None) -> FastAPI:
    """The app; `engine` defaults to an `AsyncLLM` of `config.engine`, loaded at startup."""
    state = ServerState(config, engine or AsyncLLM(config.engine), Metrics(),
                        tenants=Tenants.from_options(config.api_key, config.api_keys_file), on_fatal=on_fatal)
    state.engine.add_step_listener(state.metrics.observe_step)
    state.engine.add_death_listener(state.engine_died)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        # Load in the background: the server answers (503 "loading") meanwhile.
        loading = asyncio.create_task(state.finish_loading())
        try:
            yield
        finally:
            state.start_draining()
            loading.cancel()
            await state.engine.drain(config.drain_timeout)
            await state.engine.stop()
            logger.info("engine stopped")

    app = FastAPI(title="dspark-serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=config.max_request_bytes,
                       timeout=config.body_timeout)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                           expose_headers=["X-Request-Id"])
    app.add_middleware(ErrorCountingMiddleware, metrics=state.metrics)  # sees 413s too
    app.add_middleware(StalledClientMiddleware, timeout=config.send_timeout)
    app.add_middleware(RequestIdMiddleware)  # outermost: every response carries its id

    chat_page = CHAT_PAGE.read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def chat_page_route() -> HTMLResponse:
        return HTMLResponse(chat_page)  # static; its API calls carry the key the user types

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        await _serving(request)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(state.metrics.render(state.engine.stats), media_type=CONTENT_TYPE_LATEST)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_check_api_key)])

    @v1.get("/models")
    async def models(ctx: Serving) -> ModelList:
        return ModelList(data=[ModelCard(id=ctx.model_name, max_model_len=ctx.max_model_len)])

    @v1.post("/chat/completions", openapi_extra=request_body(ChatCompletionRequest))
    async def chat(request: Request, ctx: Serving) -> Response:
        plan = await plan_chat(await _parse(request, ChatCompletionRequest), ctx)
        return await respond(request, plan, CHAT, ctx)

    @v1.post("/completions", openapi_extra=request_body(CompletionRequest))
    async def completions(request: Request, ctx: Serving) -> Response:
        plan = await plan_completion(await _parse(request, CompletionRequest), ctx)
        return await respond(request, plan, COMPLETION, ctx)

    app.include_router(v1)

    # vLLM's utility endpoints, at the root as vLLM serves them
    utility = APIRouter(dependencies=[Depends(_check_api_key)])

    @utility.post("/tokenize", openapi_extra=request_body(TokenizeRequest))
    async def tokenize_route(request: Request, ctx: Serving) -> TokenizeResponse:
        return await tokenize(await _parse(request, TokenizeRequest), ctx)

    @utility.post("/detokenize", openapi_extra=request_body(DetokenizeRequest))
    async def detokenize_route(request: Request, ctx: Serving) -> DetokenizeResponse:
        return await detokenize(await _parse(request, DetokenizeRequest), ctx)

    app.include_router(utility)
    openapi.install(app, [ChatCompletionRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest])
    return app
