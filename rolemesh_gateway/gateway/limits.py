"""Per-client limits and model access: what a named client key may use, and how much.

A key in ``auth.client_api_keys`` written as a mapping may carry ``models`` (the aliases it
may see and use), ``rate_limit: {requests_per_minute, tokens_per_minute}`` and
``max_concurrent``. Keys with none of these have no :class:`ClientPolicy` and pay one dict
lookup per request, nothing more.

**The algorithm: a fixed 60-second window per key and budget**, opened by the first request
(or the first tokens) counted in it and closed 60 s later. A key with 60 requests per minute
gets exactly 60 requests in a burst, whatever its speed, and then 429 with ``Retry-After``
saying when the window closes. Chosen over a token bucket (GCRA) because the counts are exact
and the same in one process and in Redis (a counter with an expiry, as in Redis's own rate
limiter pattern); the price is the classic one: a client that waits for the window to close
can send up to twice its limit within any 60 s that straddles two windows.

- Requests are counted at admission (refused requests don't count).
- Tokens are counted after the fact, from the ``usage`` the upstream reports (as LiteLLM does;
  a stream reports it in its last event, when it does; one that does not, because its client
  left first, counts one token per event relayed): a key is refused once the tokens of its
  window reach ``tokens_per_minute``, so the answer that crosses the limit is not cut.
- ``max_concurrent``: requests of the key in flight (a stream until it ends); the next one is
  refused at once with 429, not queued.

**With a shared Redis registry** Redis does the counting, in two Lua scripts (each atomic), on
the registry's connection: requests and tokens in counters that expire with their window
(``SET NX PX`` then ``INCR``), requests in flight as leases in a sorted set scored by their
expiry (:data:`LEASE_S`), so the leases of a gateway that died mid-request free themselves. So
the limits hold across gateways. While Redis cannot be reached every gateway counts alone
(per-gateway limits, kept in memory), says so once in its log, and once when Redis is back.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..common.asgi import Message
from ..common.auth import key_id
from ..common.errors import RateLimited, TokensRateLimited
from .metrics import Stats
from .registry import NodeRegistry
from .registry.redis import RedisRegistry
from .settings import ClientKey, Settings

log = logging.getLogger("rolemesh.limits")

#: The length of a rate-limit window, in seconds ("per minute").
WINDOW_S = 60.0
#: How long a request in flight holds its place in Redis at most (a gateway that dies mid-request
#: frees it then; a stream longer than this stops counting against ``max_concurrent``).
LEASE_S = 600.0
#: After a failed Redis call, count locally this long before asking Redis again.
RETRY_REDIS_S = 1.0

REQUESTS, TOKENS, CONCURRENT = "requests_per_minute", "tokens_per_minute", "max_concurrent"
#: The reason label of ``rolemesh_client_rejected_total`` for a model the key may not use.
MODELS = "models"


@dataclass(frozen=True, slots=True)
class ClientPolicy:
    """What one named client key may do (built once per config from its :class:`ClientKey`)."""

    name: str
    #: The aliases it may use; None: all.
    models: frozenset[str] | None
    #: The alias a request without ``model`` goes to: ``default_model``, or else its first model.
    default: str
    #: Its aliases as clients name them, for the "does not exist" message.
    listed: tuple[str, ...]
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None

    @property
    def limited(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute or self.max_concurrent)


def client_policies(settings: Settings) -> dict[str | None, ClientPolicy]:
    """The policy of every client key that has one, by key id (what the guard returns)."""
    out: dict[str | None, ClientPolicy] = {}
    for k in settings.auth.client_api_keys:
        if not isinstance(k, ClientKey) or (k.rate_limit, k.max_concurrent, k.models) == (None, None, None):
            continue
        models = settings.client_models(k)
        default = settings.default_alias
        if models is not None and default not in models:
            default = models[0]
        rate = k.rate_limit
        out[key_id(k.key)] = ClientPolicy(
            name=k.name,
            models=frozenset(models) if models is not None else None,
            default=default,
            listed=tuple(settings.advertised_name(a) for a in models or settings.models),
            requests_per_minute=rate.requests_per_minute if rate else None,
            tokens_per_minute=rate.tokens_per_minute if rate else None,
            max_concurrent=k.max_concurrent,
        )
    return out


#: OpenAI streams that report usage only when asked (``stream_options.include_usage``).
_USAGE_ON_REQUEST = frozenset({"/v1/chat/completions", "/v1/completions"})


def ask_usage(upstream_path: str, data: dict[str, Any]) -> bool:
    """Ask a stream of a key with ``tokens_per_minute`` to report its usage; True if ``data``
    changed. Without it llama-server (like OpenAI) sends none, and the tokens would go uncounted;
    the client gets one more event at the end, with empty ``choices`` and the usage."""
    if data.get("stream") is not True or upstream_path not in _USAGE_ON_REQUEST:
        return False
    options = data.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    data["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return True


def refusal(p: ClientPolicy, reason: str, used: int, wait_s: float) -> RateLimited:
    """The 429 for a key over one of its limits (OpenAI's wording and shape)."""
    retry = max(1, math.ceil(wait_s))
    if reason == CONCURRENT:
        return RateLimited(
            f"Too many requests in flight for client key '{p.name}': limit {p.max_concurrent} "
            f"(max_concurrent). Try again when one of them has finished.",
            retry_after=retry,
        )
    limit = p.requests_per_minute if reason == REQUESTS else p.tokens_per_minute
    what = "requests per minute (RPM)" if reason == REQUESTS else "tokens per minute (TPM)"
    cls = RateLimited if reason == REQUESTS else TokensRateLimited
    return cls(
        f"Rate limit reached for client key '{p.name}' on {what}: limit {limit}, used {used}. "
        f"Please try again in {retry}s.",
        retry_after=retry,
    )


@dataclass(slots=True)
class Ticket:
    """An admitted request of a limited key; :meth:`ClientLimits.release` it when it is done."""

    policy: ClientPolicy
    #: Its lease in Redis; None when it was counted in this gateway only.
    lease: str | None = None
    released: bool = False
    #: SSE events relayed: a stream's tokens when it reports no usage (its client left first).
    events: int = 0


class _Window:
    __slots__ = ("ends", "used")

    def __init__(self, ends: float) -> None:
        self.ends = ends
        self.used = 0


class LocalCounts:
    """The limits counted in this process: one gateway, or several while Redis is away."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._requests: dict[str, _Window] = {}
        self._tokens: dict[str, _Window] = {}
        self.inflight: defaultdict[str, int] = defaultdict(int)

    def _open(self, table: dict[str, _Window], name: str, now: float) -> _Window | None:
        w = table.get(name)
        if w is not None and w.ends <= now:
            del table[name]
            return None
        return w

    def admit(self, p: ClientPolicy) -> tuple[str, int, float] | None:
        """Count the request in; or ``(reason, used, seconds to wait)`` when it is over a limit."""
        now = self.clock()
        requests = self._open(self._requests, p.name, now)
        if p.requests_per_minute and requests is not None and requests.used >= p.requests_per_minute:
            return REQUESTS, requests.used, requests.ends - now
        if p.tokens_per_minute:
            tokens = self._open(self._tokens, p.name, now)
            if tokens is not None and tokens.used >= p.tokens_per_minute:
                return TOKENS, tokens.used, tokens.ends - now
        if p.max_concurrent and self.inflight[p.name] >= p.max_concurrent:
            return CONCURRENT, self.inflight[p.name], 1.0
        if p.requests_per_minute:
            if requests is None:
                requests = self._requests[p.name] = _Window(now + WINDOW_S)
            requests.used += 1
        if p.max_concurrent:
            self.inflight[p.name] += 1
        return None

    def release(self, p: ClientPolicy, tokens: int) -> None:
        if p.max_concurrent and self.inflight[p.name] > 0:
            self.inflight[p.name] -= 1
        self.add_tokens(p, tokens)

    def add_tokens(self, p: ClientPolicy, tokens: int) -> None:
        if p.tokens_per_minute and tokens > 0:
            now = self.clock()
            w = self._open(self._tokens, p.name, now)
            if w is None:
                w = self._tokens[p.name] = _Window(now + WINDOW_S)
            w.used += tokens


# KEYS: requests counter, tokens counter, in-flight leases (sorted set by expiry, ms).
# ARGV: requests/min, tokens/min, max concurrent (0: none), window ms, lease id, lease ms.
# Returns {0} when admitted, else {reason (1 requests, 2 tokens, 3 concurrent), ms to wait, used}.
_ADMIT = """
local rpm, tpm, maxc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local function over(key, limit)
  local used = tonumber(redis.call('GET', key) or '0')
  if used < limit then return nil end
  local ms = redis.call('PTTL', key)
  if ms < 0 then
    redis.call('PEXPIRE', key, ARGV[4])
    ms = tonumber(ARGV[4])
  end
  return {ms, used}
end
if rpm > 0 then
  local o = over(KEYS[1], rpm)
  if o then return {1, o[1], o[2]} end
end
if tpm > 0 then
  local o = over(KEYS[2], tpm)
  if o then return {2, o[1], o[2]} end
end
local now = 0
if maxc > 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  local n = redis.call('ZCARD', KEYS[3])
  if n >= maxc then return {3, 1000, n} end
end
if rpm > 0 then
  redis.call('SET', KEYS[1], 0, 'PX', ARGV[4], 'NX')
  redis.call('INCR', KEYS[1])
end
if maxc > 0 then
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[6]), ARGV[5])
  redis.call('PEXPIRE', KEYS[3], ARGV[6])
end
return {0}
"""
# KEYS: tokens counter, in-flight leases. ARGV: tokens (0: none), window ms, lease id ('': none).
_RELEASE = """
if tonumber(ARGV[1]) > 0 then
  redis.call('SET', KEYS[1], 0, 'PX', ARGV[2], 'NX')
  redis.call('INCRBY', KEYS[1], ARGV[1])
end
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[2], ARGV[3]) end
return 1
"""
_REASONS = {1: REQUESTS, 2: TOKENS, 3: CONCURRENT}


class SharedCounts:
    """The limits counted in Redis, on the shared registry's connection."""

    def __init__(self, registry: RedisRegistry, prefix: str, clock: Callable[[], float]) -> None:
        self._registry = registry
        self._prefix = f"{prefix}:limits:"
        self._clock = clock
        self._admit = registry.redis.register_script(_ADMIT)
        self._release = registry.redis.register_script(_RELEASE)
        from redis.exceptions import RedisError

        self._errors = (*registry.errors, RedisError)
        self._leases = itertools.count(1)
        self._me = os.urandom(6).hex()
        #: Why Redis cannot be reached, while it cannot (logged once each way).
        self.outage: str | None = None
        self._retry_at = 0.0

    def usable(self) -> bool:
        """Ask Redis now? Not while the registry knows it is away, nor right after a failure."""
        if self._registry.outage is not None:
            self.down(self._registry.outage)
            return False
        if self.outage is None:
            return True
        now = self._clock()
        if now < self._retry_at:
            return False
        self._retry_at = now + RETRY_REDIS_S  # one request probes; the others don't wait on it
        return True

    def down(self, reason: str) -> None:
        if self.outage is None:
            log.error(
                "per-client limits: Redis at %s is unreachable (%s): this gateway counts the "
                "limits of its clients alone (per-gateway limits) until it is back",
                self._registry.url,
                reason,
            )
        self.outage = reason
        self._retry_at = self._clock() + RETRY_REDIS_S

    def up(self) -> None:
        if self.outage is not None:
            log.warning(
                "per-client limits: Redis at %s is reachable again: limits hold across gateways again",
                self._registry.url,
            )
            self.outage = None

    def _keys(self, name: str) -> list[str]:
        base = self._prefix + name
        return [f"{base}:requests", f"{base}:tokens", f"{base}:inflight"]

    async def admit(self, p: ClientPolicy) -> tuple[str, int, float] | str:
        """Count the request in Redis: its lease id, or ``(reason, used, seconds to wait)``."""
        lease = f"{self._me}-{next(self._leases)}" if p.max_concurrent else ""
        args = [
            p.requests_per_minute or 0,
            p.tokens_per_minute or 0,
            p.max_concurrent or 0,
            int(WINDOW_S * 1000),
            lease,
            int(LEASE_S * 1000),
        ]
        result: list[Any] = await self._admit(keys=self._keys(p.name), args=args)
        if result[0] == 0:
            return lease
        return _REASONS[int(result[0])], int(result[2]), int(result[1]) / 1000

    async def release(self, p: ClientPolicy, lease: str, tokens: int) -> None:
        keys = self._keys(p.name)[1:]
        await self._release(keys=keys, args=[tokens, int(WINDOW_S * 1000), lease])

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        """Redis away, or refusing the call: either way this gateway counts alone for now."""
        return self._errors


class ClientLimits:
    """Admits and releases the requests of limited keys; one per gateway, kept across reloads."""

    def __init__(
        self,
        stats: Stats,
        registry: NodeRegistry | None = None,
        prefix: str = "rolemesh",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stats = stats
        self.local = LocalCounts(clock)
        self.shared = SharedCounts(registry, prefix, clock) if isinstance(registry, RedisRegistry) else None

    async def admit(self, p: ClientPolicy) -> Ticket:
        """A ticket for the request, or :class:`RateLimited` (429) when the key is over a limit."""
        shared = self.shared
        if shared is not None and shared.usable():
            try:
                got = await shared.admit(p)
            except shared.errors as exc:
                shared.down(str(exc) or exc.__class__.__name__)
            else:
                shared.up()
                if isinstance(got, str):
                    return Ticket(p, got)
                self._refused(p, got)
        over = self.local.admit(p)
        if over is not None:
            self._refused(p, over)
        return Ticket(p)

    def _refused(self, p: ClientPolicy, over: tuple[str, int, float]) -> None:
        reason, used, wait_s = over
        self._stats.client_rejected[(p.name, reason)] += 1
        raise refusal(p, reason, used, wait_s)

    async def on_body(self, ticket: Ticket, message: Message, usage: tuple[int, int] | None) -> None:
        """A body part of the answer of a limited request is going out: before the last one,
        release the ticket; before the others, count a stream's events (for ``tokens_per_minute``)."""
        if not message.get("more_body", False):
            await self.release(ticket, usage)
        elif ticket.policy.tokens_per_minute:
            ticket.events += message.get("body", b"").count(b"data:")

    async def release(self, ticket: Ticket, usage: tuple[int, int] | None) -> None:
        """The request is done: free its place, count the tokens it used (once; later calls: no-op)."""
        if ticket.released:
            return
        ticket.released = True
        p = ticket.policy
        tokens = 0
        if p.tokens_per_minute:  # as reported; else about one token per event of a stream
            tokens = sum(usage) if usage is not None else ticket.events
        if ticket.lease is None:
            self.local.release(p, tokens)
            return
        if not tokens and not p.max_concurrent:
            return
        # Shielded: a client that hangs up now cancels the request, but its place must still be
        # given back (else it would stay taken until its lease expires).
        await asyncio.shield(self._release_shared(p, ticket.lease, tokens))

    async def _release_shared(self, p: ClientPolicy, lease: str, tokens: int) -> None:
        shared = self.shared
        assert shared is not None
        try:
            await shared.release(p, lease, tokens)
        except shared.errors as exc:
            # The lease expires on its own; the tokens are counted here, for as long as Redis is away.
            shared.down(str(exc) or exc.__class__.__name__)
            self.local.add_tokens(p, tokens)
