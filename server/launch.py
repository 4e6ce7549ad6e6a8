"""Run the app under uvicorn: bind first (so port 0 resolves before startup), drain on SIGTERM."""

import logging
import signal
import socket
from collections.abc import Callable
from types import FrameType

import uvicorn

from server.app import create_app
from server.config import ServerConfig
from server.process import LISTENING

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn's server that also tells the app when SIGTERM/SIGINT arrives.

    uvicorn then stops accepting connections, waits (up to `timeout_graceful_shutdown`) for open
    ones to finish, and runs the lifespan shutdown; the app meanwhile answers 503 to anything new
    that still reaches it on an open connection."""

    def __init__(self, config: uvicorn.Config, on_exit_signal: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit_signal = on_exit_signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        logger.info("received %s", signal.Signals(sig).name)
        self._on_exit_signal()
        super().handle_exit(sig, frame)


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it (Linux). Without it, a small write (a response body
    # after its headers, an SSE chunk) on a kept-alive connection waits for the client's
    # delayed ACK: +40 ms per request and per chunk.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def serve(config: ServerConfig) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code."""
    server: DrainingServer | None = None

    def exit_now() -> None:  # the model cannot load or the engine died: no point in staying up
        if server is not None:
            server.should_exit = True

    app = create_app(config, on_fatal=exit_now)
    uv_config = uvicorn.Config(app, log_level=config.log_level.lower(), lifespan="on",
                               timeout_graceful_shutdown=max(1, round(config.drain_timeout)))
    server = DrainingServer(uv_config, app.state.server.start_draining)
    sock = bind_socket(config.host, config.port)
    host, port = sock.getsockname()[:2]
    logger.info(LISTENING, host, port)
    logger.info("loading model %s on %s (%s) in the background; /health answers 503 until ready",
                config.engine.model or "<embedded default>", config.engine.device,
                config.engine.dtype)
    server.run(sockets=[sock])
    state = app.state.server
    return 1 if state.load_error is not None or state.engine_failed else 0
