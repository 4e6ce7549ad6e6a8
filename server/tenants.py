"""API keys and what each may use: requests in flight at once and tokens per minute (429 with
Retry-After beyond them), plus the per-request deadline.

Keys come from `--api-key` (one key, no limits) and/or `--api-keys-file`, a JSON file:

    {"keys": [{"key": "sk-team-a", "name": "team-a", "max_concurrent": 4,
               "tokens_per_minute": 20000}, {"key": "sk-ops", "name": "ops"}]}

Tokens per minute is a token bucket of that size refilled continuously: a request's prompt
tokens are charged when it is admitted (refused while the bucket holds fewer), its completion
tokens as it ends, so a key overshoots by at most its in-flight requests' outputs.
"""

import asyncio
import hmac
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from engine.output_processor import RequestOutput
from scheduler import DeadlineExceeded
from server.errors import APIError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    max_concurrent: int = 0  # requests in flight at once; 0: no limit
    tokens_per_minute: int = 0  # prompt + completion tokens; 0: no limit


ANONYMOUS = Tenant("anonymous")  # no keys configured: no limits either


def load_keys(path: str | Path) -> dict[str, Tenant]:
    """The keys file as {key: tenant}; a malformed file is a start-up error naming the problem."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        entries = raw["keys"]
        if not isinstance(entries, list):
            raise TypeError("'keys' must be a list")
        keys: dict[str, Tenant] = {}
        for i, entry in enumerate(entries):
            key = entry["key"]
            if not isinstance(key, str) or not key.strip():
                raise ValueError(f"keys[{i}].key must be a non-empty string")
            tenant = Tenant(str(entry.get("name", f"key-{i}")), int(entry.get("max_concurrent", 0)),
                            int(entry.get("tokens_per_minute", 0)))
            if tenant.max_concurrent < 0 or tenant.tokens_per_minute < 0:
                raise ValueError(f"keys[{i}]: limits must be >= 0")
            if key in keys:
                raise ValueError(f"keys[{i}]: duplicate key")
            if any(t.name == tenant.name for t in keys.values()):  # limits are kept per name
                raise ValueError(f"keys[{i}]: duplicate name {tenant.name!r}")
            keys[key] = tenant
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--api-keys-file {path}: {e!r}") from e
    return keys


@dataclass(slots=True)
class _Usage:
    in_flight: int = 0
    bucket: float = 0.0  # tokens available now (may go below 0 after long outputs)
    refilled_at: float = 0.0


class Lease:
    """One admitted request's hold on its tenant's limits; released once (later calls do nothing)."""

    def __init__(self, usage: _Usage | None, prompt_tokens: int = 0) -> None:
        self._usage = usage
        self._prompt_tokens = prompt_tokens
        self._released = False

    def release(self, completion_tokens: int, ran: bool) -> None:
        """`ran`: the engine produced output; a request refused or failed before that gets
        its prompt tokens back (a client retrying a 503 does not burn its budget)."""
        if self._released or self._usage is None:
            return
        self._released = True
        self._usage.in_flight -= 1
        self._usage.bucket -= completion_tokens - (0 if ran else self._prompt_tokens)


@dataclass
class Tenants:
    """Who may call the API and how much. Used on the event loop only (no locks)."""

    keys: Mapping[str, Tenant] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic
    _usage: dict[str, _Usage] = field(default_factory=dict)

    @classmethod
    def from_options(cls, api_key: str | None, keys_file: str | None) -> "Tenants":
        keys = load_keys(keys_file) if keys_file else {}
        if api_key:
            keys.setdefault(api_key, Tenant("default"))
        return cls(keys)

    def authenticate(self, authorization: str) -> Tenant:
        """The tenant of an `Authorization: Bearer KEY` header, else a 401."""
        if not self.keys:
            return ANONYMOUS
        scheme, _, token = authorization.partition(" ")
        given = token.strip().encode()
        found = None
        for key, tenant in self.keys.items():  # every key compared: no timing side channel
            if hmac.compare_digest(given, key.encode()):
                found = tenant
        if scheme.lower() != "bearer" or found is None:
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return found

    def admit(self, tenant: Tenant, prompt_tokens: int) -> Lease:
        """Take a slot and charge the prompt, or refuse with 429 and when to retry."""
        if not tenant.max_concurrent and not tenant.tokens_per_minute:
            return Lease(None)
        usage = self._refilled(tenant)
        if tenant.max_concurrent and usage.in_flight >= tenant.max_concurrent:
            raise _rate_limited(f"key {tenant.name!r} already has {usage.in_flight} requests in "
                                f"flight, its limit", 1.0)
        if tenant.tokens_per_minute:
            if prompt_tokens > tenant.tokens_per_minute:  # can never pass: not worth a retry
                raise APIError(400, f"the prompt has {prompt_tokens} tokens (times n), more than key "
                               f"{tenant.name!r} may use per minute ({tenant.tokens_per_minute})",
                               "messages", "request_too_large")
            if usage.bucket < prompt_tokens:
                rate = tenant.tokens_per_minute / 60.0
                raise _rate_limited(f"key {tenant.name!r} is over its {tenant.tokens_per_minute} "
                                    f"tokens per minute", (prompt_tokens - usage.bucket) / rate)
            usage.bucket -= prompt_tokens
        usage.in_flight += 1
        return Lease(usage, prompt_tokens if tenant.tokens_per_minute else 0)

    def _refilled(self, tenant: Tenant) -> _Usage:
        now = self.clock()
        usage = self._usage.get(tenant.name)
        if usage is None:
            usage = self._usage[tenant.name] = _Usage(bucket=tenant.tokens_per_minute, refilled_at=now)
        usage.bucket = min(tenant.tokens_per_minute,
                           usage.bucket + (now - usage.refilled_at) * tenant.tokens_per_minute / 60.0)
        usage.refilled_at = now
        return usage


def _rate_limited(message: str, retry_after: float) -> APIError:
    return APIError(429, f"rate limit: {message}; retry after the Retry-After seconds",
                    code="rate_limit_exceeded", headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


async def guarded(outputs: AsyncIterator[tuple[int, RequestOutput]], lease: Lease,
                  timeout: float | None) -> AsyncIterator[tuple[int, RequestOutput]]:
    """`outputs`, charged to `lease` as they end and cut off `timeout` s from now (closing
    them aborts the requests in the engine)."""
    # asyncio.timeout cancels this task's wait in place (no task per output, unlike wait_for);
    # the cancellation reaches `outputs`, whose cleanup aborts the requests
    deadline = asyncio.get_running_loop().time() + timeout if timeout else None
    completion_tokens, ran = 0, False
    try:
        async with aclosing(outputs):
            while True:
                try:
                    async with asyncio.timeout_at(deadline) as cutoff:  # None: no deadline
                        item = await anext(outputs)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    if cutoff.expired():
                        raise DeadlineExceeded(f"the request did not finish within the server's "
                                               f"limit of {timeout:g} s (--request-timeout)") from None
                    raise
                completion_tokens += len(item[1].delta_token_ids)
                ran = True
                yield item
    finally:
        lease.release(completion_tokens, ran)
