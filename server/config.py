"""Settings of the HTTP layer; the engine's own settings stay in `EngineConfig`."""

from dataclasses import dataclass, field

from engine.config import EngineConfig


@dataclass(frozen=True, slots=True)
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    # JSON file of API keys with per-key limits (server/tenants.py); combined with api_key
    api_keys_file: str | None = None
    # Name clients pass as `model`; None = the name the checkpoint reports.
    served_model_name: str | None = None
    max_request_bytes: int = 1 << 20
    # After SIGTERM, how long running requests may take before they are aborted.
    drain_timeout: float = 30.0
    log_level: str = "info"
    # reasoning_content from think blocks: "auto" (when the chat template has them), "think", "none"
    reasoning_parser: str = "auto"
    # origins a browser page may call the API from (CORS); empty: no cross-origin access
    cors_origins: tuple[str, ...] = ()
    # a request still running after this many seconds is aborted (504 / in-band); None: never
    request_timeout: float | None = None
    # a request body must arrive within this many seconds (else 408): slow uploads hold a slot
    body_timeout: float = 30.0
    # a client that accepts no response bytes for this long is dropped and its request aborted
    send_timeout: float = 60.0
