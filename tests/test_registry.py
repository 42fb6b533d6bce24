"""The in-memory registry: idempotent registration, freshness, bounds, eviction."""

from __future__ import annotations

import asyncio

import pytest

from rolemesh_gateway.common.errors import RegistryFull
from rolemesh_gateway.common.protocol import HeartbeatRequest, RegisterRequest
from rolemesh_gateway.gateway.registry import MemoryRegistry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reg(clock: Clock, max_nodes: int = 10) -> MemoryRegistry:
    return MemoryRegistry(stale_after_s=30, evict_after_s=300, max_nodes=max_nodes, clock=clock)


def req(node_id: str, *roles: str, url: str = "http://10.0.0.1:8091") -> RegisterRequest:
    return RegisterRequest(node_id=node_id, base_url=url, roles=list(roles))


def test_register_is_idempotent_and_updates() -> None:
    clock = Clock()
    r = reg(clock)

    async def go() -> None:
        node, new = await r.register(req("a", "writer"), "key-1")
        assert new and r.nodes_for_role("writer") == (node,)
        same, new = await r.register(req("a", "planner", url="http://10.0.0.2:1"), "key-1")
        assert same is node and not new
        assert node.base_url == "http://10.0.0.2:1"
        assert r.nodes_for_role("writer") == () and r.nodes_for_role("planner") == (node,)

    asyncio.run(go())


def test_freshness_heartbeat_and_eviction() -> None:
    clock = Clock()
    r = reg(clock)

    async def go() -> None:
        node, _ = await r.register(req("a", "writer"), None)
        assert r.count_for_role("writer") == {"fresh": 1, "stale": 0, "ejected": 0, "draining": 0}
        clock.now += 31
        assert r.state(node, clock.now) == "stale"
        assert r.count_for_role("writer") == {"fresh": 0, "stale": 1, "ejected": 0, "draining": 0}
        hb = await r.heartbeat(HeartbeatRequest(node_id="a", slots_total=4, slots_busy=1))
        assert hb is node and r.usable(node, clock.now) and node.slots_total == 4
        assert await r.heartbeat(HeartbeatRequest(node_id="zz")) is None
        clock.now += 301
        assert await r.sweep() == ["a"]
        assert r.all_nodes() == [] and r.nodes_for_role("writer") == ()

    asyncio.run(go())


def test_registry_is_bounded() -> None:
    r = reg(Clock(), max_nodes=2)

    async def go() -> None:
        await r.register(req("a", "w"), None)
        await r.register(req("b", "w"), None)
        with pytest.raises(RegistryFull):
            await r.register(req("c", "w"), None)
        await r.register(req("a", "w"), None)  # re-registering an existing node still works
        assert await r.deregister("a") and not await r.deregister("a")
        await r.register(req("c", "w"), None)

    asyncio.run(go())
