"""cache_aware: prefix match, thresholds, eviction bound, node removal, sessions, bounded load."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import orjson
import pytest

from rolemesh_gateway.common.errors import ConfigError, QueueTimeout, UpstreamUnreachable
from rolemesh_gateway.gateway.cache_aware import (
    CacheAware,
    CacheAwareConfig,
    RoutingRequest,
    prompt_text,
    routing_request,
)
from rolemesh_gateway.gateway.routes import Outbound
from tests.fakeclient import Raise, Reply, Sent, run
from tests.test_routes import CHAT, Fleet, make_settings, url

SYSTEM = "You are a careful planner. " * 40  # ~1 KB shared by every conversation


def chat(*turns: str, system: str = SYSTEM, user: str | None = None) -> dict[str, Any]:
    msgs = [{"role": "system", "content": system}]
    for i, text in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    data: dict[str, Any] = {"model": "chat", "messages": msgs}
    if user is not None:
        data["user"] = user
    return data


def req(data: dict[str, Any], session: bytes | None = None, block: int = 128) -> RoutingRequest:
    headers = [(b"x-session-id", session)] if session is not None else []
    return routing_request(data, headers, block)


class Loads:
    """In-flight counts per node, as the route keeps them."""

    def __init__(self, **counts: int) -> None:
        self.counts = Counter(counts)

    def strategy(self, config: CacheAwareConfig | None = None) -> CacheAware:
        return CacheAware(lambda n: float(self.counts[n]), config, inflight=lambda n: self.counts[n])


NODES = ("a", "b", "c")


def anyone(_n: object) -> bool:
    return True


# -- the request's text and blocks ---------------------------------------------------------------
def test_text_is_in_reading_order_and_a_turn_extends_the_previous_one() -> None:
    one, two = chat("plan a trip"), chat("plan a trip", "ok: Rome", "and then?")
    assert prompt_text(two).startswith(prompt_text(one))
    assert "plan a trip" in prompt_text(
        {"prompt": "x", "messages": [{"role": "user", "content": "plan a trip"}]}
    )
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image"}]}]}
    assert "look" in prompt_text(parts)
    assert prompt_text({"system": "be brief", "messages": []}) == "be brief"
    r1, r2 = req(one), req(two)
    full = len(prompt_text(one)) // 128
    assert r1.blocks[:full] == r2.blocks[:full]  # the same keys for the same prefix
    assert r1.chars == len(prompt_text(one)) and r1.blocks[-1][1] == r1.chars


def test_session_from_the_header_else_the_body_user() -> None:
    assert req(chat("hi", user="u-7")).session == "u-7"
    assert req(chat("hi", user="u-7"), session=b"s-1").session == "s-1"
    assert req(chat("hi")).session is None
    assert routing_request(None, [], 128) == RoutingRequest([], 0, None)


# -- prefix match and thresholds -----------------------------------------------------------------
def test_the_next_turn_goes_to_the_node_that_served_the_previous_one() -> None:
    loads = Loads()
    ca = loads.strategy()
    first = req(chat("plan a trip to Rome " * 20))
    node = ca.choose(NODES, anyone, first)
    assert node is not None
    ca.learn(node, first)
    second = req(chat("plan a trip to Rome " * 20, "Day 1: the Forum", "and day 2?"))
    # Even when that node is the busiest (within the balance thresholds and the load bound,
    # ceil(1.25 * (7 + 1) / 3) = 4), it wins.
    loads.counts.update({"a": 2, "b": 2, "c": 2})
    loads.counts[node] = 3
    assert {ca.choose(NODES, anyone, second) for _ in range(10)} == {node}


def test_a_short_match_goes_to_the_least_loaded_node() -> None:
    loads = Loads(a=3, b=0, c=2)
    ca = loads.strategy()
    seen = req(chat("x", system="tiny"))
    ca.learn("a", seen)
    # A long new prompt sharing only a few characters with what a served: under the threshold.
    other = req(chat("y" * 2000, system="tiny"))
    assert ca.choose(NODES, anyone, other) == "b"


def test_the_threshold_is_configurable() -> None:
    loads = Loads(a=1, b=1, c=0)
    prompt = chat("question " * 100, system="s")
    longer = chat("question " * 100, "answer " * 100, "more " * 150, system="s")  # known: < 50%
    strict = loads.strategy()
    strict.learn("a", req(prompt))
    assert strict.choose(NODES, anyone, req(longer)) != "a"
    lax = loads.strategy(CacheAwareConfig(match_threshold=0.2))
    lax.learn("a", req(prompt))
    assert lax.choose(NODES, anyone, req(longer)) == "a"


def test_out_of_balance_goes_to_the_least_loaded_node_whatever_the_match() -> None:
    loads = Loads(a=40, b=2, c=5)
    ca = loads.strategy()
    conv = req(chat("long conversation " * 50))
    ca.learn("a", conv)
    assert ca.choose(NODES, anyone, conv) == "b"
    # Both thresholds must be crossed: 24 vs 15 is 9 apart, below balance_abs=32 (and 24 is
    # under the load bound, ceil(1.25 * 60 / 3) = 25).
    loads.counts["a"], loads.counts["b"], loads.counts["c"] = 24, 20, 15
    assert ca.choose(NODES, anyone, conv) == "a"
    # A smaller absolute threshold makes the same loads out of balance.
    tight = loads.strategy(CacheAwareConfig(balance_abs=4))
    tight.learn("a", conv)
    assert tight.choose(NODES, anyone, conv) == "c"


def test_a_matching_node_that_cannot_take_the_request_is_passed_over() -> None:
    loads = Loads()
    ca = loads.strategy()
    conv = req(chat("the same talk " * 60))
    ca.learn("a", conv)
    assert ca.choose(NODES, lambda n: n != "a", conv) in {"b", "c"}
    assert ca.choose(NODES, lambda n: False, conv) is None
    assert ca.choose((), anyone, conv) is None


# -- memory bound and node removal ---------------------------------------------------------------
def test_the_map_is_bounded_and_evicts_the_least_recently_used() -> None:
    loads = Loads(a=1, b=1, c=0)
    ca = loads.strategy(CacheAwareConfig(max_entries=50, block_chars=16))
    old = req(chat("old conversation " * 20, system="old"), block=16)
    ca.learn("a", old)
    assert ca.choose(NODES, anyone, old) == "a"
    for i in range(30):
        ca.learn("b", req(chat(f"conversation number {i} " * 10, system=f"sys {i}"), block=16))
        assert len(ca) <= 50
    assert len(ca) == 50
    assert not any(key in ca._map for key, _ in old.blocks)
    assert ca.choose(NODES, anyone, old) == "c"  # forgotten: the least loaded node


def test_the_head_of_a_prompt_outlives_its_tail() -> None:
    ca = Loads().strategy(CacheAwareConfig(max_entries=10, block_chars=16))
    conv = req(chat("q" * 400, system="s"), block=16)  # 26 blocks, only 10 fit
    ca.learn("a", conv)
    assert [key in ca._map for key, _ in conv.blocks] == [True] * 10 + [False] * (len(conv.blocks) - 10)


def test_a_node_that_leaves_the_role_is_forgotten() -> None:
    loads = Loads()
    ca = loads.strategy()
    conv = req(chat("remember me " * 50))
    assert ca.choose(NODES, anyone, conv) is not None
    ca.learn("a", conv)
    assert len(ca) > 0
    assert ca.choose(("b", "c"), anyone, conv) in {"b", "c"}  # a left: membership changed
    assert len(ca) == 0  # nothing else held those prefixes
    # It comes back (a fresh llama-server): no stale claim that it holds the prompt.
    loads.counts.update(b=0, c=0, a=1)
    assert ca.choose(NODES, anyone, conv) in {"b", "c"}


# -- sessions ------------------------------------------------------------------------------------
def test_a_session_is_pinned_and_sessions_spread_over_the_nodes() -> None:
    ca = Loads().strategy()
    picks = {}
    for i in range(60):
        s = f"session-{i}"
        picks[s] = ca.choose(NODES, anyone, req(chat(f"turn one of {i}"), session=s.encode()))
        # Later turns, different text, same session: same node.
        for turn in range(3):
            again = req(chat(f"other text {turn}"), session=s.encode())
            assert ca.choose(NODES, anyone, again) == picks[s]
    share = Counter(picks.values())
    assert set(share) == set(NODES) and max(share.values()) <= 35


def test_the_session_ring_is_the_same_on_every_gateway() -> None:
    one, two = Loads().strategy(), Loads().strategy()
    for i in range(20):
        r = req(chat("hello"), session=f"s{i}".encode())
        assert one.choose(NODES, anyone, r) == two.choose(NODES, anyone, r)


def test_a_session_spills_to_the_next_node_when_its_own_is_overloaded() -> None:
    """Bounded load: a node may carry at most ceil(1.25 * (in flight + 1) / nodes)."""
    loads = Loads(a=2, b=2, c=2)
    ca = loads.strategy()
    r = req(chat("hi"), session=b"user-42")
    home = ca.choose(NODES, anyone, r)
    assert home is not None
    loads.counts[home] = 3  # bound: ceil(1.25 * (7 + 1) / 3) = 4 >= 3 + 1: still home
    assert ca.choose(NODES, anyone, r) == home
    loads.counts[home] = 4  # now 4 + 1 > ceil(1.25 * 9 / 3) = 4: the next node on the ring
    spill = ca.choose(NODES, anyone, r)
    assert spill is not None and spill != home
    assert ca.choose(NODES, anyone, r) == spill  # the same one each time (the ring's order)
    loads.counts[home] = 2  # back under the bound: home again
    assert ca.choose(NODES, anyone, r) == home


# -- in a route: learn from the node that served, queue like least_busy -------------------------
def outbound(data: dict[str, Any]) -> Outbound:
    return Outbound("POST", CHAT, [], orjson.dumps(data), [], data=data)


def test_route_learns_on_the_node_that_actually_served_after_a_failover() -> None:
    async def go() -> None:
        f = Fleet(make_settings({"strategy": "cache_aware"}))
        await f.add("a")
        await f.add("b")
        f.client.on(url("a"), Raise(UpstreamUnreachable("cannot connect to node a")))
        f.client.on(url("b"), Reply.json(200, {"ok": 1}))
        first = chat("a long first question " * 30)
        for _ in range(2):
            await f.chat.forward(outbound(first), Sent())
        # a refused both times, so the prefix is b's: every later turn goes to b first.
        f.client.calls.clear()
        f.client.on(url("a"), Reply.json(200, {"ok": 1}))
        for _ in range(4):
            await f.chat.forward(outbound(chat("a long first question " * 30, "yes", "more")), Sent())
        assert [c.url for c in f.client.calls] == [url("b")] * 4
        # rolemesh_cache_aware_decisions_total says why: the first turn by least load, then prefix.
        assert f.chat.stats.cache_decisions[("chat", "prefix")] == 5

    run(go())


def test_route_does_not_learn_from_a_client_error_and_queues_when_full() -> None:
    async def go() -> None:
        f = Fleet(make_settings({"strategy": "cache_aware", "cache_aware": {"match_threshold": 0.3}}))
        await f.add("a", slots_total=1)
        f.client.on(url("a"), Reply.json(400, {"error": {"message": "bad"}}))
        await f.chat.forward(outbound(chat("x" * 500)), Sent())
        assert f.chat._cache is not None and len(f.chat._cache) == 0
        assert f.chat.queue is not None  # cache_aware queues like least_busy

    run(go())


def test_cache_aware_settings_need_the_strategy() -> None:
    with pytest.raises(ConfigError, match="need 'strategy: cache_aware'"):
        make_settings({"cache_aware": {"match_threshold": 0.7}})
    with pytest.raises(ConfigError, match="match_threshold"):
        make_settings({"strategy": "cache_aware", "cache_aware": {"match_threshold": 2}})


def test_routing_an_8kb_chat_costs_little() -> None:
    """A coarse guard (the bench measures it precisely): well under a millisecond per request."""
    ca = Loads().strategy()
    data = chat(*(f"turn {i} " + "words " * 120 for i in range(11)))
    assert len(orjson.dumps(data)) > 8000
    ca.learn("a", req(data))
    started = time.perf_counter()
    for _ in range(200):
        ca.choose(NODES, anyone, routing_request(data, [], 128))
    assert (time.perf_counter() - started) / 200 < 0.001


def test_the_node_holding_a_conversation_takes_it_even_with_its_slots_busy() -> None:
    async def go() -> None:
        f = Fleet(make_settings({"strategy": "cache_aware", "queue": {"max_size": 5, "max_wait_s": 0.2}}))
        a, b = await f.add("a", slots_total=1), await f.add("b", slots_total=1)
        f.client.on(url("a"), Reply.json(200, {"ok": 1}))
        f.client.on(url("b"), Reply.json(200, {"ok": 1}))
        conv = chat("a long question " * 40)
        await f.chat.forward(outbound(conv), Sent())
        home = f.client.calls[-1].url
        home_node, other = (a, b) if home == url("a") else (b, a)
        home_node.inflight = 1  # its only slot is busy: llama-server will queue the next turn
        await f.chat.forward(outbound(chat("a long question " * 40, "yes", "go on")), Sent())
        assert f.client.calls[-1].url == home
        # A new conversation (nothing known but the shared system prompt) goes where there is room.
        await f.chat.forward(outbound(chat("unrelated " * 300, system="x")), Sent())
        assert f.client.calls[-1].url == url(other.node_id)
        # Every node full and nothing held: the request waits in the queue like least_busy's.
        other.inflight = 1
        with pytest.raises(QueueTimeout):
            await f.chat.forward(outbound(chat("another " * 300, system="y")), Sent())

    run(go())


def test_a_shared_system_prompt_does_not_draw_every_new_conversation_to_one_node() -> None:
    loads = Loads()
    ca = loads.strategy()
    ca.learn("a", req(chat("conversation 0: first question")))  # a served the shared prompt first
    picks: Counter[str] = Counter()
    for i in range(1, 10):  # new conversations arrive while the earlier ones are in flight
        node = ca.choose(NODES, anyone, req(chat(f"conversation {i}: first question")))
        assert node is not None
        loads.counts[node] += 1
        picks[node] += 1
    assert set(picks) == set(NODES) and max(picks.values()) <= 4
