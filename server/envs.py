"""The one registry of environment variables this project reads. All are named `DSPARK_*`.

Read them only through `get()`, so every variable is listed (and documented) here.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class EnvVar:
    name: str
    default: Any
    parse: Callable[[str], Any]
    help: str


_VARS = [
    EnvVar("DSPARK_API_KEY", None, str,
           "bearer token required on /v1/* (health and metrics stay open); unset = no auth"),
    EnvVar("DSPARK_API_KEYS_FILE", None, str,
           "JSON file of API keys with per-key limits (concurrent requests, tokens per minute)"),
    EnvVar("DSPARK_REQUEST_TIMEOUT", 0.0, float,
           "seconds after which a running request is aborted (0 = no limit)"),
    EnvVar("DSPARK_HOST", "127.0.0.1", str, "address `dspark serve` binds to"),
    EnvVar("DSPARK_PORT", 8000, int, "port `dspark serve` listens on (0 = ephemeral)"),
    EnvVar("DSPARK_MAX_REQUEST_BYTES", 1 << 20, int, "largest request body accepted (else 413)"),
    EnvVar("DSPARK_DRAIN_TIMEOUT", 30.0, float,
           "seconds running requests may take to finish after SIGTERM"),
    EnvVar("DSPARK_LOG_LEVEL", "info", str, "log level of the server (debug, info, warning, ...)"),
    EnvVar("DSPARK_CORS_ORIGINS", "", str,
           "comma-separated origins browsers may call the API from (empty: CORS off)"),
    EnvVar("DSPARK_REASONING_PARSER", "auto", str,
           "think blocks as reasoning_content: auto (when the chat template has them), think, none"),
]
REGISTRY: dict[str, EnvVar] = {v.name: v for v in _VARS}


def get(name: str) -> Any:
    """The parsed value of a registered variable, or its default when unset or empty."""
    var = REGISTRY[name]  # KeyError for an unregistered name is deliberate
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return var.default
    try:
        return var.parse(raw)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={raw!r} is invalid: {e}") from e
