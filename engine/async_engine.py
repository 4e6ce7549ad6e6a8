"""`AsyncLLM`: the engine's step loop in its own thread, per-request output streams for asyncio.

`LLMEngine` is not thread-safe, so exactly one thread owns it: it loads the model, then loops
"apply queued add/abort commands -> step -> hand the outputs to the event loop". The event loop
talks to it only through a thread-safe command queue, and receives outputs through
`loop.call_soon_threadsafe` into one asyncio queue per request.
"""

import asyncio
import logging
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine, StepStats
from engine.output_processor import RequestOutput
from engine.tokenizer import Tokenizer
from scheduler import EngineDead, InvalidRequest, RequestFailed, SamplingParams
from scheduler.block_manager import PrefixCacheStats

logger = logging.getLogger(__name__)


class _Aborted:
    """Ends a stream whose request was aborted through `abort()`."""


# What a request's stream receives: an output, the error that ends it, or an abort.
_StreamItem = RequestOutput | BaseException | _Aborted


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """Facts fixed once the model is loaded; safe to read from any thread."""

    model_name: str
    max_model_len: int
    device: str
    dtype: str
    tokenizer: Tokenizer  # a Rust tokenizer: read-only use is thread-safe


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot taken by the step loop after each iteration (for gauges)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache: PrefixCacheStats = field(default_factory=lambda: PrefixCacheStats(0, 0, 0, 0, 0))


@dataclass(frozen=True, slots=True)
class _Add:
    req_id: str
    prompt: str | list[int]
    params: SamplingParams
    arrival_time: float
    prompt_parent: str | None = None
    cache_salt: str | None = None


@dataclass(frozen=True, slots=True)
class _Abort:
    req_id: str


class _Stop:
    pass


_Command = _Add | _Abort | _Stop


class AsyncLLM:
    """Serve an `LLMEngine` to asyncio code. `start()` must be called on the event loop."""

    def __init__(self, config: EngineConfig,
                 engine_factory: Callable[[EngineConfig], LLMEngine] = LLMEngine) -> None:
        self.config = config
        self._engine_factory = engine_factory
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[_StreamItem]] = {}  # event-loop side only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._loaded = threading.Event()
        self._idle: asyncio.Event | None = None  # set while no request is in flight
        self._info: EngineInfo | None = None
        self._stats = EngineStats()
        self._error: BaseException | None = None  # why the loop stopped, once it has
        self._step_listeners: list[Callable[[StepStats], None]] = []
        self._death_listeners: list[Callable[[BaseException], None]] = []
        self._last_step: StepStats | None = None

    def add_step_listener(self, listener: Callable[[StepStats], None]) -> None:
        """Call `listener` on the engine thread with the statistics of every engine step."""
        self._step_listeners.append(listener)

    def add_death_listener(self, listener: Callable[[BaseException], None]) -> None:
        """Call `listener(error)` on the event loop if the step loop dies (not on `stop()`),
        after every in-flight stream has been failed."""
        self._death_listeners.append(listener)

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; it loads the model, then runs the step loop."""
        if self._thread is not None:
            raise RuntimeError("AsyncLLM already started")
        self._loop = asyncio.get_running_loop()
        if self.config.gil_switch_interval > 0:
            sys.setswitchinterval(min(sys.getswitchinterval(), self.config.gil_switch_interval))
        self._idle = asyncio.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="dspark-engine", daemon=True)
        self._thread.start()

    async def wait_loaded(self, timeout: float | None = None) -> EngineInfo:
        """Wait until the model is loaded; raise the load error if loading failed."""
        loaded = await asyncio.to_thread(self._loaded.wait, timeout)
        if self._error is not None:
            raise self._error
        if not loaded or self._info is None:
            raise TimeoutError(f"the model did not load within {timeout} s")
        return self._info

    async def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` s for in-flight requests to finish; abort the rest.

        Returns True when everything finished in time."""
        assert self._idle is not None, "start() first"
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            logger.warning("drain timed out after %.1f s; aborting %d requests", timeout,
                           len(self._streams))
            self._fail_streams(EngineDead("the server is shutting down"))
            return False

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop the step loop (aborting whatever is left) and wait for the thread to end."""
        if self._thread is None:
            return
        self._commands.put(_Stop())
        await asyncio.to_thread(self._thread.join, timeout)
        if self._thread.is_alive():
            logger.warning("engine thread still busy after %.1f s; leaving it (daemon)", timeout)
        self._fail_streams(EngineDead("the engine has stopped"))

    # ---- state -------------------------------------------------------------------------

    @property
    def is_loaded(self) -> bool:
        return self._info is not None

    @property
    def is_dead(self) -> bool:
        return self._error is not None

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def info(self) -> EngineInfo:
        if self._info is None:
            raise EngineDead("the model is not loaded yet")
        return self._info

    @property
    def stats(self) -> EngineStats:
        return self._stats

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # ---- requests ----------------------------------------------------------------------

    async def generate(self, prompt: str | list[int], params: SamplingParams, req_id: str,
                       arrival_time: float | None = None,
                       prompt_parent: str | None = None,
                       cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs until it finishes.

        Errors of `add_request` (InvalidRequest, CapacityExceeded) are raised from the first
        iteration. Closing or cancelling the iterator early aborts the request in the engine,
        which frees its KV blocks."""
        if self._error is not None:
            raise EngineDead(f"the engine is not running: {self._error}")
        if req_id in self._streams:
            raise InvalidRequest(f"duplicate request id {req_id!r}")
        assert self._idle is not None, "start() first"
        stream: asyncio.Queue[_StreamItem] = asyncio.Queue()
        self._streams[req_id] = stream
        self._idle.clear()
        self._commands.put(_Add(req_id, prompt, params, arrival_time or time.monotonic(), prompt_parent,
                                cache_salt))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, _Aborted):
                    finished = True  # abort() already told the engine
                    return
                if isinstance(item, BaseException):
                    finished = True  # the engine no longer knows this request
                    raise item
                if item.finish_reason == "error":
                    finished = True
                    raise RequestFailed("the model computed non-finite values (NaN or inf) for this "
                                        "request, so it was stopped; no such token was sent")
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            # Runs on normal exit, on an exception, on task cancellation (client gone) and on
            # aclose()/GeneratorExit, so an abandoned request never keeps its KV blocks.
            del self._streams[req_id]
            if not finished:
                self._commands.put(_Abort(req_id))
            if not self._streams:
                self._idle.set()

    def abort(self, req_id: str) -> None:
        """Abort a request from any thread; its stream then ends without a finished output."""
        self._commands.put(_Abort(req_id))
        self._post(self._dispatch, [(req_id, _Aborted())])

    # ---- the engine thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            engine = self._engine_factory(self.config)
        except BaseException as e:
            logger.exception("loading the model failed")
            self._error = e
            self._loaded.set()
            return
        self._info = EngineInfo(engine.model_name, engine.max_model_len, str(engine.device),
                                engine.config.dtype, engine.tokenizer)
        self._loaded.set()
        try:
            self._step_loop(engine)
        except BaseException as e:
            logger.exception("the engine step loop died")
            self._error = EngineDead(f"the engine step loop died: {e!r}")
            self._post(self._fail_streams, self._error)
            for listener in self._death_listeners:
                self._post(listener, self._error)
            return
        self._error = EngineDead("the engine has stopped")

    def _step_loop(self, engine: LLMEngine) -> None:
        while True:
            # Block on the command queue only when there is nothing to compute, so an idle
            # engine costs no CPU and a busy one never waits for commands.
            batch: list[tuple[str, _StreamItem]] = []
            if not self._apply_commands(engine, batch, block=not engine.has_unfinished()):
                return
            if engine.has_unfinished():
                batch.extend((out.req_id, out) for out in engine.step())
                stats = engine.last_step
                if stats is not None and stats is not self._last_step:
                    self._last_step = stats
                    for listener in self._step_listeners:
                        listener(stats)
            self._stats = EngineStats(engine.scheduler.num_running, engine.scheduler.num_waiting,
                                      engine.block_manager.usage, engine.block_manager.stats())
            if batch:
                self._post(self._dispatch, batch)

    def _apply_commands(self, engine: LLMEngine, batch: list[tuple[str, _StreamItem]],
                        block: bool) -> bool:
        """Apply all queued commands; returns False on a stop command."""
        commands = [self._commands.get()] if block else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                break
        for cmd in commands:
            if isinstance(cmd, _Stop):
                for req_id in list(engine.scheduler.requests):
                    engine.abort_request(req_id)
                return False
            if isinstance(cmd, _Abort):
                engine.abort_request(cmd.req_id)
                continue
            try:
                engine.add_request(cmd.prompt, cmd.params, cmd.req_id, cmd.arrival_time, cmd.prompt_parent,
                                   cmd.cache_salt)
            except Exception as e:  # noqa: BLE001
                batch.append((cmd.req_id, e))  # a refusal fails its own stream, not the loop
        return True

    def _post(self, fn: Callable[..., None], *args: object) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    # ---- event-loop side ---------------------------------------------------------------

    def _dispatch(self, batch: list[tuple[str, _StreamItem]]) -> None:
        for req_id, item in batch:
            stream = self._streams.get(req_id)
            if stream is not None:  # None: the consumer went away, its abort is queued
                stream.put_nowait(item)

    def _fail_streams(self, error: BaseException) -> None:
        for req_id, stream in self._streams.items():
            stream.put_nowait(error)
            self._commands.put(_Abort(req_id))
