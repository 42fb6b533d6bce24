"""The in-memory registry: the one freshness rule, membership, bounds and the role index."""

from __future__ import annotations

from typing import Any

import pytest

from rolemesh_gateway.common.errors import NodeOwnedElsewhere, RegistryFull
from rolemesh_gateway.common.protocol import HeartbeatRequest, RegisterRequest
from rolemesh_gateway.gateway.registry import MemoryRegistry, Node
from tests.fakeclient import run

STALE_S = 30.0
EVICT_S = 300.0


class Clock:
    def __init__(self) -> None:
        self.now = 5_000.0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock, max_nodes: int = 10) -> MemoryRegistry:
    return MemoryRegistry(stale_after_s=STALE_S, evict_after_s=EVICT_S, max_nodes=max_nodes, clock=clock)


def req(node_id: str, *roles: str, url: str = "http://10.0.0.1:8091", **load: Any) -> RegisterRequest:
    return RegisterRequest(node_id=node_id, base_url=url, roles=list(roles), **load)


def ids(nodes: Any) -> list[str]:
    return [n.node_id for n in nodes]


def test_state_is_fresh_then_stale_at_exactly_stale_after_s() -> None:
    async def go() -> None:
        clock = Clock()
        r = make(clock)
        node, new = await r.register(req("a", "chat"), None)
        assert new and r.state(node, clock()) == "fresh" and r.usable(node, clock())
        assert r.state(node, clock() + STALE_S - 0.001) == "fresh"
        assert r.state(node, clock() + STALE_S) == "stale"
        assert not r.usable(node, clock() + STALE_S)

    run(go())


def test_ejected_is_a_state_of_its_own_and_stale_wins_over_it() -> None:
    async def go() -> None:
        clock = Clock()
        r = make(clock)
        node, _ = await r.register(req("a", "chat"), None)
        node.ejected_until = clock() + 10
        assert r.state(node, clock()) == "ejected" and not r.usable(node, clock())
        assert r.state(node, clock() + 10) == "fresh" and r.usable(node, clock() + 10)
        node.ejected_until = clock() + 100
        assert r.state(node, clock() + STALE_S) == "stale"  # gone quiet: stale, whatever else

    run(go())


def test_count_for_role_agrees_with_state_and_usable() -> None:
    async def go() -> None:
        clock = Clock()
        r = make(clock)
        for node_id in ("f1", "f2", "s1", "e1"):
            await r.register(req(node_id, "chat"), None)
        clock.now += STALE_S + 1
        for node_id in ("f1", "f2", "e1"):
            await r.heartbeat(HeartbeatRequest(node_id=node_id))
        e1 = next(n for n in r.all_nodes() if n.node_id == "e1")
        e1.ejected_until = clock() + 5
        counts = r.count_for_role("chat")
        assert counts == {"fresh": 2, "stale": 1, "ejected": 1, "draining": 0}
        now = clock()
        nodes = r.nodes_for_role("chat")
        assert counts["fresh"] == sum(r.usable(n, now) for n in nodes)
        assert {n.node_id: r.state(n, now) for n in nodes} == {
            "f1": "fresh",
            "f2": "fresh",
            "s1": "stale",
            "e1": "ejected",
        }
        assert r.count_for_role("nobody") == {"fresh": 0, "stale": 0, "ejected": 0, "draining": 0}

    run(go())


def test_register_twice_updates_in_place() -> None:
    async def go() -> None:
        clock = Clock()
        r = make(clock)
        node, new = await r.register(req("a", "chat", slots_total=4), "key-1")
        assert new and node.key_id == "key-1" and node.slots_total == 4
        clock.now += 5
        again, new = await r.register(req("a", "chat", url="http://10.0.0.9:1"), "key-1")
        assert again is node and not new
        assert (node.base_url, node.key_id, node.last_seen) == ("http://10.0.0.9:1", "key-1", clock())
        assert node.slots_total == 4  # load not re-sent is kept
        assert r.all_nodes() == [node] and ids(r.nodes_for_role("chat")) == ["a"]

    run(go())


def test_re_registration_clears_passive_health() -> None:
    async def go() -> None:
        clock = Clock()
        r = make(clock)
        node, _ = await r.register(req("a", "chat"), None)
        node.failures, node.ejected_until = 5, clock() + 60
        await r.register(req("a", "chat"), None)
        assert node.failures == 0 and r.state(node, clock()) == "fresh"

    run(go())


def test_role_index_follows_re_registration_with_other_roles() -> None:
    async def go() -> None:
        clock = Clock()
        r = make(clock)
        a, _ = await r.register(req("a", "chat", "code"), None)
        await r.register(req("b", "chat"), None)
        assert ids(r.nodes_for_role("chat")) == ["a", "b"] and ids(r.nodes_for_role("code")) == ["a"]
        await r.register(req("a", "code", "embed", "embed"), None)
        assert a.roles == ("code", "embed")  # duplicates dropped, order kept
        assert ids(r.nodes_for_role("chat")) == ["b"]
        assert ids(r.nodes_for_role("code")) == ["a"] and ids(r.nodes_for_role("embed")) == ["a"]
        await r.register(req("b", "code"), None)
        assert r.nodes_for_role("chat") == ()  # nobody serves chat any more
        assert ids(r.nodes_for_role("code")) == ["a", "b"]
        assert r.count_for_role("chat") == {"fresh": 0, "stale": 0, "ejected": 0, "draining": 0}

    run(go())


def test_heartbeat_refreshes_and_stores_load() -> None:
    async def go() -> None:
        clock = Clock()
        r = make(clock)
        node, _ = await r.register(req("a", "chat", slots_total=2), None)
        clock.now += STALE_S + 5
        assert r.state(node, clock()) == "stale"
        hb = await r.heartbeat(HeartbeatRequest(node_id="a", slots_busy=1, inflight=3))
        assert hb is node and r.state(node, clock()) == "fresh"
        assert (node.slots_total, node.slots_busy, node.reported_inflight) == (2, 1, 3)
        assert await r.heartbeat(HeartbeatRequest(node_id="ghost")) is None
        assert ids(r.all_nodes()) == ["a"]  # a heartbeat never creates a node

    run(go())


def test_heartbeat_after_being_stale_forgets_old_failures_but_not_while_fresh() -> None:
    async def go() -> None:
        clock = Clock()
        r = make(clock)
        node, _ = await r.register(req("a", "chat"), None)
        node.failures, node.ejected_until = 2, clock() + 10
        await r.heartbeat(HeartbeatRequest(node_id="a"))
        assert node.failures == 2 and r.state(node, clock()) == "ejected"  # fresh: cooling down
        clock.now += STALE_S + 1
        await r.heartbeat(HeartbeatRequest(node_id="a"))
        assert node.failures == 0 and r.state(node, clock()) == "fresh"

    run(go())


def test_deregister_removes_the_node_everywhere() -> None:
    async def go() -> None:
        r = make(Clock())
        await r.register(req("a", "chat", "code"), None)
        await r.register(req("b", "chat"), None)
        assert await r.deregister("a")
        assert not await r.deregister("a")
        assert ids(r.all_nodes()) == ["b"]
        assert ids(r.nodes_for_role("chat")) == ["b"] and r.nodes_for_role("code") == ()
        assert await r.heartbeat(HeartbeatRequest(node_id="a")) is None

    run(go())


def test_sweep_evicts_only_nodes_silent_longer_than_evict_after_s() -> None:
    async def go() -> None:
        clock = Clock()
        r = make(clock)
        await r.register(req("old", "chat"), None)
        clock.now += EVICT_S / 2
        await r.register(req("young", "chat"), None)
        clock.now += EVICT_S / 2
        assert await r.sweep() == []  # old is exactly evict_after_s quiet: kept (stale) for now
        clock.now += 1
        assert await r.sweep() == ["old"]
        assert ids(r.all_nodes()) == ["young"] and ids(r.nodes_for_role("chat")) == ["young"]
        assert r.count_for_role("chat") == {"fresh": 0, "stale": 1, "ejected": 0, "draining": 0}

    run(go())


def test_registry_full_at_max_nodes_but_known_nodes_may_re_register() -> None:
    async def go() -> None:
        r = make(Clock(), max_nodes=2)
        await r.register(req("a", "chat"), None)
        await r.register(req("b", "chat"), None)
        with pytest.raises(RegistryFull, match=r"full \(2 nodes\)") as info:
            await r.register(req("c", "chat"), None)
        assert info.value.status == 507
        assert ids(r.all_nodes()) == ["a", "b"] and ids(r.nodes_for_role("chat")) == ["a", "b"]
        _, new = await r.register(req("a", "code"), None)
        assert not new
        assert await r.deregister("b")
        node, new = await r.register(req("c", "chat"), None)
        assert new and isinstance(node, Node)

    run(go())


def test_load_is_inflight_over_slots() -> None:
    async def go() -> None:
        r = make(Clock())
        sized, _ = await r.register(req("a", "chat", slots_total=4), None)
        unsized, _ = await r.register(req("b", "chat"), None)
        sized.inflight = unsized.inflight = 2
        assert sized.load() == 0.5 and unsized.load() == 2.0

    run(go())


def test_usable_nodes_for_many_roles_share_one_node_object() -> None:
    async def go() -> None:
        r = make(Clock())
        await r.register(req("a", "chat", "code"), None)
        (chat,) = r.nodes_for_role("chat")
        (code,) = r.nodes_for_role("code")
        chat.inflight = 1
        assert code is chat and code.inflight == 1  # in-flight counts are per node, not per role

    run(go())


def test_a_node_belongs_to_the_key_that_registered_it() -> None:
    """Audit finding 6: another key can neither take over, keep alive nor remove a node."""

    async def go() -> None:
        r = make(Clock())
        node, _ = await r.register(req("a", "chat"), "key-1")
        with pytest.raises(NodeOwnedElsewhere) as info:
            await r.register(req("a", "chat", url="http://10.6.6.6:1"), "key-2")
        assert info.value.status == 403
        assert node.base_url != "http://10.6.6.6:1"  # nothing changed
        with pytest.raises(NodeOwnedElsewhere):
            await r.heartbeat(HeartbeatRequest(node_id="a"), "key-2")
        with pytest.raises(NodeOwnedElsewhere):
            await r.deregister("a", "key-2")
        assert r.all_nodes() == [node]
        assert await r.deregister("a", "key-1")  # its own key may
        await r.register(req("a", "chat"), "key-2")  # and once gone, the id is free again

    run(go())


def test_a_quota_of_nodes_per_key() -> None:
    async def go() -> None:
        r = MemoryRegistry(
            stale_after_s=30, evict_after_s=300, max_nodes=100, max_nodes_per_key=2, clock=Clock()
        )
        await r.register(req("a", "chat"), "key-1")
        await r.register(req("b", "chat"), "key-1")
        with pytest.raises(RegistryFull, match="max_nodes_per_key"):
            await r.register(req("c", "chat"), "key-1")
        await r.register(req("a", "chat"), "key-1")  # re-registering an own node is fine
        await r.register(req("c", "chat"), "key-2")  # another key has its own quota

    run(go())


def test_cold_roles_are_kept_per_node_and_counted_per_role() -> None:
    async def go() -> None:
        r = make(Clock())
        a, _ = await r.register(req("a", "chat", "code", cold_roles=["chat", "code"]), None)
        b, _ = await r.register(req("b", "chat", cold_roles=["chat"]), None)
        assert a.cold == {"chat", "code"} and r.has_cold("chat") and r.has_cold("code")
        # A heartbeat without the field (an older agent's) changes nothing; with it, it replaces.
        await r.heartbeat(HeartbeatRequest(node_id="a"))
        assert a.cold == {"chat", "code"}
        await r.heartbeat(HeartbeatRequest(node_id="a", cold_roles=["chat"]))
        assert a.cold == {"chat"} and not r.has_cold("code")
        # A role a node no longer has is not cold; one it never had cannot be.
        await r.register(req("b", "other", cold_roles=["chat", "nope"]), None)
        assert b.cold == frozenset() and r.has_cold("chat")
        await r.deregister("a")
        assert not r.has_cold("chat")
        # Registering again without the field (an older agent): every role warm.
        c, _ = await r.register(req("c", "chat", cold_roles=["chat"]), None)
        await r.register(req("c", "chat"), None)
        assert c.cold == frozenset() and not r.has_cold("chat")

    run(go())
