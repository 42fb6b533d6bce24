"""A node registry shared by several gateways through Redis.

Writes (register, heartbeat, deregister, evict) are single Lua scripts, so each is atomic in
Redis: the node-count bound cannot be overrun by two gateways at once and a heartbeat never
resurrects a node another gateway just removed. Reads on the request path stay local: each
gateway keeps the in-memory view of :class:`MemoryRegistry` and refreshes it every
``registry.sync_interval_s`` (last-seen times and load always; node data only when the shared
membership version moved), so routing never waits for Redis.

Layout under ``<prefix>:``: ``nodes`` hash id -> JSON (url, roles, key id, version),
``seen`` sorted set id -> last heartbeat (wall-clock seconds), ``load`` hash id -> JSON,
``version`` counter bumped on every membership change.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from ...common.errors import RegistryFull
from ...common.protocol import HeartbeatRequest, RegisterRequest
from .base import Node
from .memory import MemoryRegistry

log = logging.getLogger("rolemesh.registry")

_REGISTER = """
local exists = redis.call('HEXISTS', KEYS[1], ARGV[1])
if exists == 0 and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[2]) then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[5])
redis.call('INCR', KEYS[4])
return exists
"""
_HEARTBEAT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('ZADD', KEYS[2], 'GT', ARGV[2], ARGV[1])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[3], ARGV[1], ARGV[3]) end
return 1
"""
_DEREGISTER = """
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
if removed == 1 then redis.call('INCR', KEYS[4]) end
return removed
"""
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


def _load_json(slots_total: int | None, slots_busy: int | None, inflight: int | None) -> bytes:
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
        self._redis = aioredis.from_url(url, decode_responses=False)
        self._keys = [f"{prefix}:{name}" for name in ("nodes", "seen", "load", "version")]
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
        load = _load_json(req.slots_total, req.slots_busy, req.inflight)
        existed = await self._register(keys=self._keys, args=[req.node_id, self.max_nodes, now, data, load])
        if existed == -1:
            raise RegistryFull(f"the shared registry is full ({self.max_nodes} nodes)")
        node, _ = self._registered(req, key_id, now)
        return node, existed == 0

    async def heartbeat(self, req: HeartbeatRequest) -> Node | None:
        node = self._nodes.get(req.node_id)
        if node is None:  # maybe registered through another gateway since our last sync
            await self.sync()
            node = self._nodes.get(req.node_id)
        now = self.clock()
        if node is not None:
            node.apply_load(req)
        load = _load_json(node.slots_total, node.slots_busy, node.reported_inflight) if node else b""
        if not await self._heartbeat(keys=self._keys[:3], args=[req.node_id, now, load]):
            if node is not None:  # removed elsewhere
                self._drop(req.node_id)
            return None
        assert node is not None
        self._touch(node, now)
        return node

    async def deregister(self, node_id: str) -> bool:
        removed = await self._deregister(keys=self._keys, args=[node_id])
        return bool(self._drop(node_id) or removed)

    async def sweep(self) -> list[str]:
        gone = await self._evict(keys=self._keys, args=[self.clock() - self.evict_after_s])
        ids = [g.decode() if isinstance(g, bytes) else str(g) for g in gone]
        for node_id in ids:
            self._drop(node_id)
        return ids

    async def sync(self) -> None:
        """Pull last-seen times and load for all nodes; node data when membership changed."""
        nodes_key, seen_key, load_key, version_key = self._keys
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.get(version_key)
            pipe.zrange(seen_key, 0, -1, withscores=True)
            pipe.hgetall(load_key)
            version, seen, loads = await pipe.execute()
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
                node.slots_total, node.slots_busy, node.reported_inflight = orjson.loads(raw)
