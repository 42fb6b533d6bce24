"""A node registry shared by several gateways through Redis.

Writes (register, heartbeat, deregister, evict) are single Lua scripts, so each is atomic in
Redis: the node-count bound cannot be overrun by two gateways at once and a heartbeat never
resurrects a node another gateway just removed. Reads on the request path stay local: each
gateway keeps the in-memory view of :class:`MemoryRegistry` and refreshes it every
``registry.sync_interval_s`` (last-seen times and load always; node data only when the shared
membership version moved), so routing never waits for Redis.

A node belongs to the key that registered it: the scripts compare the key id stored with the
node to the caller's, so no gateway can let another key take it over. When Redis cannot be
reached, node writes answer 503 (:class:`RegistryUnavailable`), the outage is logged once each
way, and routing goes on from the local view.

Layout under ``<prefix>:``: ``nodes`` hash id -> JSON (url, roles, key id, version, models),
``seen`` sorted set id -> last heartbeat (wall-clock seconds), ``load`` hash id -> JSON,
``version`` counter bumped on every membership change.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from ...common.errors import RegistryFull, RegistryUnavailable
from ...common.protocol import HeartbeatRequest, RegisterRequest
from .base import Node
from .memory import MemoryRegistry

log = logging.getLogger("rolemesh.registry")

#: Connect and read timeout for Redis calls, in seconds.
REDIS_TIMEOUT_S = 0.8

# A node's owner is the key id stored in its JSON ('' in open mode). cjson is built into Redis.
_OWNER = """
local function owner(raw)
  local k = cjson.decode(raw)['key_id']
  if k == cjson.null or k == nil then return '' end
  return k
end
"""
_REGISTER = (
    _OWNER
    + """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  if owner(cur) ~= ARGV[6] then return -2 end
else
  if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[2]) then return -1 end
  local quota = tonumber(ARGV[7])
  if quota > 0 then
    local n = 0
    for _, raw in ipairs(redis.call('HVALS', KEYS[1])) do
      if owner(raw) == ARGV[6] then n = n + 1 end
    end
    if n >= quota then return -3 end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[5])
redis.call('INCR', KEYS[4])
if cur then return 1 end
return 0
"""
)
_HEARTBEAT = (
    _OWNER
    + """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
if owner(cur) ~= ARGV[4] then return -2 end
redis.call('ZADD', KEYS[2], 'GT', ARGV[2], ARGV[1])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[3], ARGV[1], ARGV[3]) end
return 1
"""
)
_DEREGISTER = (
    _OWNER
    + """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
if owner(cur) ~= ARGV[2] then return -2 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('SREM', KEYS[5], ARGV[1])
redis.call('INCR', KEYS[4])
return 1
"""
)
_EVICT = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
for _, id in ipairs(gone) do
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
end
if #gone > 0 then redis.call('INCR', KEYS[4]) end
return gone
"""


def _load_json(
    slots_total: int | None, slots_busy: int | None, inflight: int | None, cold: Any = None
) -> bytes:
    # Cold roles (on-demand models not running) ride as a 4th item, only when there are some.
    if cold:
        return orjson.dumps([slots_total, slots_busy, inflight, sorted(cold)])
    return orjson.dumps([slots_total, slots_busy, inflight])


class RedisRegistry(MemoryRegistry):
    """The shared registry: Redis is the truth, the inherited in-memory view serves reads."""

    def __init__(self, *, url: str, prefix: str, sync_interval_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        try:
            import redis.asyncio as aioredis
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "registry.backend 'redis' needs the redis package: pip install 'rolemesh-gateway[redis]'"
            ) from exc
        self.url = url
        self.sync_interval_s = sync_interval_s
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # Fail fast when Redis is away: node writes answer 503 within a second, and routing goes
        # on from the local view; the agents retry with back-off.
        self._redis = aioredis.from_url(
            url,
            decode_responses=False,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            socket_timeout=REDIS_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )
        self._errors: tuple[type[BaseException], ...] = (
            aioredis.ConnectionError,
            aioredis.TimeoutError,
            OSError,
        )
        #: Why Redis is unreachable, while it is (logged once when it goes, once when it is back).
        self.outage: str | None = None
        self._keys = [f"{prefix}:{name}" for name in ("nodes", "seen", "load", "version")]
        #: The ids of draining nodes (a set), so that every gateway stops routing to them.
        self._draining_key = f"{prefix}:draining"
        self._version: bytes | None = None
        self._register = self._redis.register_script(_REGISTER)
        self._heartbeat = self._redis.register_script(_HEARTBEAT)
        self._deregister = self._redis.register_script(_DEREGISTER)
        self._evict = self._redis.register_script(_EVICT)

    async def start(self) -> None:
        await self._redis.ping()
        await self.sync()
        log.info("shared node registry at %s: %d nodes", self.url, len(self._nodes))

    async def close(self) -> None:
        await self._redis.aclose()

    @property
    def redis(self) -> Any:
        """The connection, for other shared state (the per-client limits)."""
        return self._redis

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        """What a call raises when Redis cannot be reached."""
        return self._errors

    # -- outages ----------------------------------------------------------------------------
    def _down(self, exc: BaseException) -> RegistryUnavailable:
        reason = str(exc) or exc.__class__.__name__
        if self.outage is None:
            log.error(
                "shared node registry at %s is unreachable (%s): routing goes on from this gateway's "
                "view; node registrations and heartbeats get 503 until it is back",
                self.url,
                reason,
            )
        self.outage = reason
        return RegistryUnavailable(f"the node registry is unavailable ({reason}); retry shortly")

    def _up(self) -> None:
        if self.outage is not None:
            log.warning("shared node registry at %s is reachable again", self.url)
            self.outage = None

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            result = await script(keys=keys, args=args)
        except self._errors as exc:
            raise self._down(exc) from None
        self._up()
        return result

    # -- writes ------------------------------------------------------------------------------
    async def register(self, req: RegisterRequest, key_id: str | None) -> tuple[Node, bool]:
        now = self.clock()
        data = orjson.dumps(
            {
                "base_url": req.base_url,
                "roles": req.roles,
                "key_id": key_id,
                "version": req.version,
                "models": req.models,
            }
        )
        load = _load_json(req.slots_total, req.slots_busy, req.inflight, req.cold_roles)
        quota = self.max_nodes_per_key or 0
        args = [req.node_id, self.max_nodes, now, data, load, key_id or "", quota]
        existed = await self._call(self._register, self._keys, args)
        if existed == -1:
            raise RegistryFull(f"the shared registry is full ({self.max_nodes} nodes)")
        if existed == -2:
            self.check_owner(req.node_id, "another key", key_id)
        if existed == -3:
            raise RegistryFull(
                f"this node key has registered {quota} nodes already (nodes.max_nodes_per_key)"
            )
        node, _ = self._registered(req, key_id, now)
        return node, existed == 0

    async def heartbeat(self, req: HeartbeatRequest, key_id: str | None = None) -> Node | None:
        node = self._nodes.get(req.node_id)
        if node is None:  # maybe registered through another gateway since our last sync
            await self.sync()
            node = self._nodes.get(req.node_id)
        now = self.clock()
        if node is not None:
            self.check_owner(req.node_id, node.key_id, key_id)
            node.apply_load(req)
            if req.cold_roles is not None:
                self.set_cold(node, req.cold_roles)
        load = (
            _load_json(node.slots_total, node.slots_busy, node.reported_inflight, node.cold) if node else b""
        )
        done = await self._call(self._heartbeat, self._keys[:3], [req.node_id, now, load, key_id or ""])
        if done == -2:
            self.check_owner(req.node_id, "another key", key_id)
        if not done:
            if node is not None:  # removed elsewhere
                self._drop(req.node_id)
            return None
        assert node is not None
        self._touch(node, now)
        return node

    async def deregister(self, node_id: str, key_id: str | None = None) -> bool:
        removed = await self._call(
            self._deregister, [*self._keys, self._draining_key], [node_id, key_id or ""]
        )
        if removed == -2:
            self.check_owner(node_id, "another key", key_id)
        return bool(self._drop(node_id) or removed)

    async def set_draining(self, node_id: str, draining: bool) -> Node | None:
        node = self._nodes.get(node_id)
        if node is None:
            return None
        try:
            if draining:
                await self._redis.sadd(self._draining_key, node_id)
            else:
                await self._redis.srem(self._draining_key, node_id)
        except self._errors as exc:
            raise self._down(exc) from None
        node.draining = draining
        return node

    async def sweep(self) -> list[str]:
        try:
            gone = await self._call(self._evict, self._keys, [self.clock() - self.evict_after_s])
        except RegistryUnavailable:
            return []  # said once already; eviction waits for Redis
        ids = [g.decode() if isinstance(g, bytes) else str(g) for g in gone]
        for node_id in ids:
            self._drop(node_id)
        return ids

    async def sync(self) -> None:
        """Pull last-seen times and load for all nodes; node data when membership changed.

        While Redis is unreachable the local view stays as it was (routing goes on) and the
        outage is logged once, not on every sync.
        """
        try:
            await self._sync()
        except self._errors as exc:
            self._down(exc)
            return
        self._up()

    async def _sync(self) -> None:
        nodes_key, seen_key, load_key, version_key = self._keys
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.get(version_key)
            pipe.zrange(seen_key, 0, -1, withscores=True)
            pipe.hgetall(load_key)
            pipe.smembers(self._draining_key)
            version, seen, loads, draining = await pipe.execute()
        if version != self._version:
            data: dict[bytes, bytes] = await self._redis.hgetall(nodes_key)  # type: ignore[assignment]
            present = set()
            for raw_id, raw in data.items():
                node_id = raw_id.decode()
                d = orjson.loads(raw)
                present.add(node_id)
                roles = tuple(dict.fromkeys(d["roles"]))
                self._upsert(
                    node_id, d["base_url"], roles, d.get("key_id"), d["version"], d.get("models"), 0.0
                )
            for node_id in [n for n in self._nodes if n not in present]:
                self._drop(node_id)
            self._version = version
        for raw_id, score in seen:
            node = self._nodes.get(raw_id.decode())
            if node is not None:
                self._touch(node, float(score))
        for raw_id, raw in loads.items():
            node = self._nodes.get(raw_id.decode())
            if node is not None:
                figures = orjson.loads(raw)
                node.slots_total, node.slots_busy, node.reported_inflight = figures[:3]
                self.set_cold(node, figures[3] if len(figures) > 3 else ())
        drained = {raw.decode() for raw in draining}
        for node_id, node in self._nodes.items():
            node.draining = node_id in drained
