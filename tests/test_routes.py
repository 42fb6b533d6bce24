"""Routes: failover, retries, ejection, staleness, node keys and the wait queue, on a scripted client."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
import pytest

from rolemesh_gateway.common.auth import KeyRing, key_id
from rolemesh_gateway.common.errors import (
    NoUpstreamAvailable,
    QueueFull,
    QueueTimeout,
    UpstreamFailed,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from rolemesh_gateway.common.protocol import NODE_KEY, HeartbeatRequest, RegisterRequest
from rolemesh_gateway.gateway.health import HealthMonitor
from rolemesh_gateway.gateway.registry import MemoryRegistry, Node
from rolemesh_gateway.gateway.routes import DiscoveredRoute, FixedRoute, Outbound, Route, build_routes
from rolemesh_gateway.gateway.settings import Settings, parse_settings
from tests.fakeclient import FakeClient, Raise, Reply, Sent, broken, run

KEY_1 = "node-key-one"
KEY_2 = "node-key-two"
CHAT = "/v1/chat/completions"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def make_settings(chat: dict[str, Any] | None = None, **nodes: Any) -> Settings:
    return parse_settings(
        {
            "version": 1,
            "default_model": "chat",
            "auth": {"node_api_keys": [KEY_1, KEY_2]},
            "nodes": {"stale_after_s": 30, "eject_after_failures": 2, "eject_for_s": 10, **nodes},
            "models": {
                "chat": {"type": "discovered", "role": "chat", **(chat or {})},
                "fixed": {"type": "proxy", "proxy_url": "http://up.test:9000"},
            },
        },
        env={},
    )


class Fleet:
    """A registry on a fake clock, a scripted client and the routes built on them."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or make_settings()
        self.clock = Clock()
        n = self.settings.nodes
        self.registry = MemoryRegistry(
            stale_after_s=n.stale_after_s,
            evict_after_s=n.evict_after_s,
            max_nodes=n.max_nodes,
            clock=self.clock,
        )
        self.client = FakeClient()
        seam: Any = self.client  # stands in for the http1.Client
        self.health = HealthMonitor(self.settings, seam)
        self.keys = KeyRing(self.settings.auth.node_api_keys)
        self.routes: dict[str, Route] = build_routes(
            self.settings, seam, self.registry, self.health, self.keys
        )

    @property
    def chat(self) -> DiscoveredRoute:
        route = self.routes["chat"]
        assert isinstance(route, DiscoveredRoute)
        return route

    async def add(self, node_id: str, key: str | None = KEY_1, **load: Any) -> Node:
        url = f"http://{node_id}.test:8091"
        req = RegisterRequest(node_id=node_id, base_url=url, roles=["chat"], **load)
        node, _ = await self.registry.register(req, key_id(key) if key else None)
        return node

    def state(self, node: Node) -> str:
        return self.registry.state(node, self.clock())


def out(n: int = 1) -> Outbound:
    body = orjson.dumps({"model": "chat", "n": n})
    return Outbound(
        "POST", CHAT, [(b"content-type", b"application/json")], body, [(b"x-request-id", b"rid-1")]
    )


def url(node_id: str) -> str:
    return f"http://{node_id}.test:8091{CHAT}"


async def send_one(route: Route, n: int = 1) -> Sent:
    sent = Sent()
    await route.forward(out(n), sent)
    return sent


# -- failover -----------------------------------------------------------------------------------
def test_refused_node_fails_over_and_the_client_sees_only_the_good_answer() -> None:
    async def go() -> None:
        f = Fleet()
        a, b = await f.add("a"), await f.add("b")
        f.client.on(url("a"), Raise(UpstreamUnreachable("cannot connect to node a")))
        f.client.on(url("b"), Reply.json(200, {"answer": "from b"}))
        sent = await send_one(f.chat)
        assert f.client.urls() == [url("a"), url("b")]
        assert sent.status == 200 and sent.json() == {"answer": "from b"}
        assert sent.header(b"x-request-id") == b"rid-1"
        # The same request went to both; a's failure counts against a only.
        assert f.client.calls[0].body == f.client.calls[1].body == out().body
        assert (a.failures, b.failures) == (1, 0)
        assert a.inflight == b.inflight == 0 and f.client.all_released()

    run(go())


def test_every_node_refusing_raises_the_last_error_and_sends_nothing() -> None:
    async def go() -> None:
        f = Fleet()
        await f.add("a")
        await f.add("b")
        f.client.on(url("a"), Raise(UpstreamUnreachable("cannot connect to node a")))
        f.client.on(url("b"), Raise(UpstreamTimeout("node b did not answer in time")))
        sent = Sent()
        with pytest.raises(UpstreamTimeout, match="node b did not answer") as info:
            await f.chat.forward(out(), sent)
        assert info.value.status == 504
        assert sent.messages == []  # the app can still answer with a clean error
        assert len(f.client.calls) == 2  # each node tried once, not max_attempts times

    run(go())


def test_5xx_head_is_retried_on_the_next_node_and_the_last_attempts_5xx_relayed_as_is() -> None:
    async def go() -> None:
        f = Fleet(make_settings({"max_attempts": 2}))
        a = await f.add("a")
        await f.add("b")
        await f.add("c")
        f.client.on(url("a"), Reply.json(503, {"error": "a is loading"}))
        f.client.on(url("b"), Reply.json(500, {"error": {"message": "b broke"}}))
        sent = await send_one(f.chat)
        assert f.client.urls() == [url("a"), url("b")]  # max_attempts: c is never tried
        assert sent.status == 500 and sent.json() == {"error": {"message": "b broke"}}
        assert a.failures == 1  # the retried 5xx counts against a
        assert f.client.all_released()

    run(go())


def test_5xx_of_the_last_node_left_is_relayed_even_below_max_attempts() -> None:
    # Two nodes, the default max_attempts of 3: the second node is the last attempt there can
    # be, so its own answer (here llama-server's "loading model") must reach the client.
    async def go() -> None:
        f = Fleet()
        assert f.chat.max_attempts == 3
        await f.add("a")
        await f.add("b")
        f.client.on(url("a"), Reply.json(503, {"error": {"message": "a is loading"}}))
        f.client.on(url("b"), Reply.json(503, {"error": {"message": "Loading model"}}))
        sent = Sent()
        await f.chat.forward(out(), sent)
        assert sent.status == 503
        assert sent.json() == {"error": {"message": "Loading model"}}

    run(go())


def test_body_failing_before_anything_was_sent_is_retried() -> None:
    async def go() -> None:
        f = Fleet()
        a, _ = await f.add("a"), await f.add("b")
        f.client.on(
            url("a"), Reply(200, b'{"half":', headers=[(b"content-length", b"20")], break_with=broken())
        )
        f.client.on(url("b"), Reply.json(200, {"whole": True}))
        sent = await send_one(f.chat)
        assert sent.status == 200 and sent.json() == {"whole": True}
        assert a.failures == 1

    run(go())


def test_stream_broken_after_the_first_byte_is_not_retried_and_ends_with_an_sse_error() -> None:
    async def go() -> None:
        f = Fleet()
        a, _ = await f.add("a"), await f.add("b")
        f.client.on(url("a"), Reply.sse(b'data: {"n":1}\n\n', break_with=broken("node a")))
        f.client.on(url("b"), Reply.json(200, {"from": "b"}))
        sent = await send_one(f.chat)  # returns: the client was told in-band
        assert f.client.urls() == [url("a")]  # a second answer would corrupt the stream
        assert sent.status == 200 and sent.finished
        first, error = sent.body.split(b"\n\n", 1)
        assert first == b'data: {"n":1}'
        assert error.startswith(b"data: ")
        event = orjson.loads(error.removeprefix(b"data: ").strip())
        assert event["error"]["code"] == "upstream_failed" and "node a" in event["error"]["message"]
        assert a.failures == 1 and f.client.all_released()

    run(go())


# -- passive health ------------------------------------------------------------------------------
def test_node_is_ejected_after_repeated_failures_and_returns_after_the_cool_down() -> None:
    async def go() -> None:
        f = Fleet()  # eject_after_failures 2, eject_for_s 10
        a, b = await f.add("a"), await f.add("b")
        f.client.on(url("a"), Raise(UpstreamUnreachable("cannot connect to node a")))
        f.client.on(url("b"), Reply.json(200, {"from": "b"}))
        for n in range(6):
            assert (await send_one(f.chat, n)).status == 200
        # Round robin starts on a every other request: a failed twice, then was ejected.
        assert f.client.urls().count(url("a")) == 2
        assert f.state(a) == "ejected" and f.state(b) == "fresh"
        assert f.registry.count_for_role("chat") == {"fresh": 1, "stale": 0, "ejected": 1, "draining": 0}

        f.clock.now += 9.9
        await send_one(f.chat)
        await send_one(f.chat)
        assert f.client.urls().count(url("a")) == 2  # still cooling down

        f.clock.now += 0.2
        assert f.state(a) == "fresh"
        f.client.on(url("a"), Reply.json(200, {"from": "a"}))
        answers = [(await send_one(f.chat, n)).json()["from"] for n in range(2)]
        assert sorted(answers) == ["a", "b"]  # a takes traffic again
        assert a.failures == 0  # a success clears the count

    run(go())


def test_stale_nodes_get_no_traffic() -> None:
    async def go() -> None:
        f = Fleet()
        old = await f.add("old")
        f.clock.now += 31  # stale_after_s is 30
        await f.add("new")
        f.client.on(url("new"), Reply.json(200, {"from": "new"}))
        for n in range(4):
            assert (await send_one(f.chat, n)).json() == {"from": "new"}
        assert url("old") not in f.client.urls()
        assert f.state(old) == "stale"
        assert f.chat.available() == (True, "ok")

    run(go())


def test_no_fresh_node_is_503_with_the_reason() -> None:
    async def go() -> None:
        f = Fleet()
        ok, reason = f.chat.available()
        assert not ok and reason == "no node has registered role 'chat'"
        with pytest.raises(NoUpstreamAvailable, match="no node has registered role 'chat'") as info:
            await send_one(f.chat)
        assert info.value.status == 503
        await f.add("a")
        f.clock.now += 31
        ok, reason = f.chat.available()
        assert not ok and "1 stale, ejected or draining" in reason
        assert f.chat.describe()["stale_nodes"] == 1
        with pytest.raises(NoUpstreamAvailable, match="model 'chat' has no available node"):
            await send_one(f.chat)
        assert f.client.calls == []

    run(go())


# -- node keys -----------------------------------------------------------------------------------
def test_each_node_gets_the_key_it_registered_with() -> None:
    async def go() -> None:
        f = Fleet(make_settings({"strategy": "round_robin"}))
        await f.add("a", key=KEY_2)
        await f.add("b", key=KEY_1)
        await f.add("open", key=None)  # registered while the gateway was open
        f.client.on("http://", Reply.json(200, {}))
        for n in range(3):
            await send_one(f.chat, n)
        sent_keys = {c.url: c.header(NODE_KEY) for c in f.client.calls}
        assert sent_keys == {url("a"): KEY_2.encode(), url("b"): KEY_1.encode(), url("open"): None}
        # Nothing else carries a credential; the request's own headers are passed on.
        for call in f.client.calls:
            assert [k for k, _ in call.headers].count(NODE_KEY) <= 1
            assert call.header(b"content-type") == b"application/json"

    run(go())


def test_verify_server_names_asks_each_nodes_certificate_for_its_node_id() -> None:
    async def go() -> None:
        for check, expected in ((True, ["a", "b"]), (False, [None, None])):
            f = Fleet(make_settings({"strategy": "round_robin"}, verify_server_names=check))
            await f.add("a")
            await f.add("b")
            f.client.on("http://", Reply.json(200, {}))
            for n in range(2):
                await send_one(f.chat, n)
            assert sorted(c.server_hostname or "" for c in f.client.calls) == sorted(
                e or "" for e in expected
            )

    run(go())


def test_a_node_whose_key_was_removed_gets_no_key() -> None:
    async def go() -> None:
        f = Fleet()
        await f.add("a", key="a-key-since-rotated-out")
        f.client.on(url("a"), Reply.json(401, {"error": {"message": "bad key"}}))
        sent = await send_one(f.chat)
        assert f.client.calls[0].header(NODE_KEY) is None
        assert sent.status == 401  # the node's refusal reaches the client; no retry on a 4xx
        assert len(f.client.calls) == 1

    run(go())


# -- the wait queue ------------------------------------------------------------------------------
def queued_fleet(max_size: int = 2, max_wait_s: float = 10.0) -> Fleet:
    return Fleet(
        make_settings({"strategy": "least_busy", "queue": {"max_size": max_size, "max_wait_s": max_wait_s}})
    )


async def wait_for(check: Any, what: str) -> None:
    for _ in range(2000):
        if check():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"never happened: {what}")


def test_queue_serves_waiters_in_arrival_order_and_refuses_when_full() -> None:
    async def go() -> None:
        f = queued_fleet(max_size=2)
        a = await f.add("a", slots_total=1)
        gates = [asyncio.Event() for _ in range(3)]
        f.client.on(url("a"), *(Reply.json(200, {"n": i + 1}, gate=g) for i, g in enumerate(gates)))
        queue = f.chat.queue
        assert queue is not None
        first = asyncio.get_running_loop().create_task(send_one(f.chat, 1))
        await wait_for(lambda: a.inflight == 1, "the first request to hold the slot")
        second = asyncio.get_running_loop().create_task(send_one(f.chat, 2))
        await wait_for(lambda: len(queue) == 1, "the second request to queue")
        third = asyncio.get_running_loop().create_task(send_one(f.chat, 3))
        await wait_for(lambda: len(queue) == 2, "the third request to queue")

        with pytest.raises(QueueFull, match=r"queue\.max_size") as info:
            await send_one(f.chat, 4)
        assert info.value.status == 429 and info.value.code == "queue_full"

        for gate in gates:
            gate.set()
            await asyncio.sleep(0)
        answers = [(await t).json()["n"] for t in (first, second, third)]
        assert answers == [1, 2, 3]
        assert [c.json()["n"] for c in f.client.calls] == [1, 2, 3]  # FIFO: 2 went before 3
        assert a.inflight == 0 and len(queue) == 0

    run(go())


def test_queue_serves_the_first_waiter_first_when_a_slot_frees() -> None:
    async def go() -> None:
        f = queued_fleet(max_size=5)
        a = await f.add("a", slots_total=1)
        hold, later = asyncio.Event(), asyncio.Event()
        f.client.on(url("a"), Reply.json(200, {}, gate=hold), Reply.json(200, {}, gate=later))
        queue = f.chat.queue
        assert queue is not None
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(send_one(f.chat, 1))]
        await wait_for(lambda: a.inflight == 1, "the slot to be taken")
        for n in (2, 3, 4):
            tasks.append(loop.create_task(send_one(f.chat, n)))
            await wait_for(lambda n=n: len(queue) == n - 1, f"request {n} to queue")
        hold.set()
        await wait_for(lambda: len(f.client.calls) == 2, "the next request to be sent")
        assert f.client.calls[1].json()["n"] == 2
        later.set()
        await asyncio.gather(*tasks)
        assert [c.json()["n"] for c in f.client.calls] == [1, 2, 3, 4]

    run(go())


def test_queue_timeout_is_503_naming_the_setting() -> None:
    async def go() -> None:
        f = queued_fleet(max_size=2, max_wait_s=0.2)
        a = await f.add("a", slots_total=1)
        never = asyncio.Event()
        f.client.on(url("a"), Reply.json(200, {}, gate=never))
        holder = asyncio.get_running_loop().create_task(send_one(f.chat, 1))
        await wait_for(lambda: a.inflight == 1, "the slot to be taken")
        with pytest.raises(QueueTimeout, match=r"waited 0\.2s for a free slot on role 'chat'") as info:
            await send_one(f.chat, 2)
        assert info.value.status == 503 and info.value.code == "queue_timeout"
        assert len(f.client.calls) == 1 and len(f.chat.queue or []) == 0
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder
        assert a.inflight == 0  # a cancelled request gives its slot back

    run(go())


def test_least_busy_uses_a_free_node_before_queueing() -> None:
    async def go() -> None:
        f = queued_fleet()
        a = await f.add("a", slots_total=1)
        b = await f.add("b", slots_total=1)
        gate = asyncio.Event()
        f.client.on("http://", Reply.json(200, {}, gate=gate))
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(send_one(f.chat, n)) for n in (1, 2)]
        await wait_for(lambda: a.inflight == b.inflight == 1, "one request on each node")
        assert len(f.chat.queue or []) == 0
        gate.set()
        await asyncio.gather(*tasks)
        assert sorted(f.client.urls()) == [url("a"), url("b")]

    run(go())


def test_a_slot_freed_through_another_alias_of_the_role_serves_the_waiter() -> None:
    # Slots belong to the node, whichever alias the request came through.
    async def go() -> None:
        queued = {"strategy": "least_busy", "queue": {"max_size": 5, "max_wait_s": 2}}
        settings = parse_settings(
            {
                "version": 1,
                "default_model": "chat",
                "auth": {"node_api_keys": [KEY_1]},
                "models": {
                    "chat": {"type": "discovered", "role": "chat", **queued},
                    "chat-long": {"type": "discovered", "role": "chat", **queued},
                },
            },
            env={},
        )
        f = Fleet(settings)
        a = await f.add("a", slots_total=1)
        gate = asyncio.Event()
        f.client.on(url("a"), Reply.json(200, {"n": 1}, gate=gate), Reply.json(200, {"n": 2}))
        loop = asyncio.get_running_loop()
        first = loop.create_task(send_one(f.routes["chat"], 1))
        await wait_for(lambda: a.inflight == 1, "the slot to be taken")
        second = loop.create_task(send_one(f.routes["chat-long"], 2))
        await wait_for(lambda: len(f.client.calls) == 1 and not second.done(), "the second to wait")
        gate.set()
        assert (await first).json() == {"n": 1}
        assert (await second).json() == {"n": 2}  # not "waited 2s ... all nodes stayed busy"

    run(go())


def test_a_node_that_joins_serves_the_queued_requests() -> None:
    async def go() -> None:
        f = queued_fleet(max_size=5, max_wait_s=2)
        a = await f.add("a", slots_total=1)
        f.client.on(url("a"), Reply.json(200, {"from": "a"}, gate=asyncio.Event()))  # busy for good
        f.client.on(url("b"), Reply.json(200, {"from": "b"}))
        loop = asyncio.get_running_loop()
        holder = loop.create_task(send_one(f.chat, 1))
        await wait_for(lambda: a.inflight == 1, "the slot to be taken")
        waiter = loop.create_task(send_one(f.chat, 2))
        queue = f.chat.queue
        assert queue is not None
        await wait_for(lambda: len(queue) == 1, "the request to queue")
        await f.add("b", slots_total=1)  # capacity arrives
        try:
            assert (await waiter).json() == {"from": "b"}
        finally:
            holder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await holder

    run(go())


# -- fixed routes --------------------------------------------------------------------------------
def test_fixed_route_is_marked_down_when_traffic_cannot_connect() -> None:
    async def go() -> None:
        f = Fleet()
        fixed = f.routes["fixed"]
        assert isinstance(fixed, FixedRoute)
        assert fixed.available() == (False, "not probed yet")
        f.client.on("http://up.test:9000/health", Reply.json(200, {"status": "ok"}))
        await f.health.probe_all()
        assert fixed.available() == (True, "ok")

        f.client.on(
            "http://up.test:9000/v1/", Raise(UpstreamUnreachable("cannot connect to upstream fixed: refused"))
        )
        with pytest.raises(UpstreamUnreachable):
            await send_one(fixed)
        assert fixed.available() == (False, "cannot connect to upstream fixed: refused")
        assert f.client.calls[-1].url == "http://up.test:9000" + CHAT

    run(go())


def test_fixed_route_relays_an_upstream_error_as_is_and_stays_up() -> None:
    async def go() -> None:
        f = Fleet()
        fixed = f.routes["fixed"]
        f.client.on("http://up.test:9000/health", Reply.json(200, {}))
        await f.health.probe_all()
        f.client.on("http://up.test:9000/v1/", Reply.json(500, {"error": {"message": "boom"}}))
        sent = await send_one(fixed)
        assert sent.status == 500 and sent.json() == {"error": {"message": "boom"}}
        assert sent.header(b"x-request-id") == b"rid-1"
        assert fixed.available() == (True, "ok")
        f.client.on("http://up.test:9000/v1/", Raise(UpstreamFailed("upstream fixed closed the connection")))
        with pytest.raises(UpstreamFailed):
            await send_one(fixed)
        assert fixed.available()[0]  # only "cannot connect" marks it down; a probe decides the rest

    run(go())


def test_describe_counts_nodes_by_state() -> None:
    async def go() -> None:
        f = Fleet(make_settings({"strategy": "random"}))
        for node_id in ("a", "b", "c"):
            await f.add(node_id)
        f.clock.now += 31
        for node_id in ("a", "b"):
            assert await f.registry.heartbeat(HeartbeatRequest(node_id=node_id), key_id(KEY_1)) is not None
        b = f.registry.nodes_for_role("chat")[1]
        b.ejected_until = f.clock.now + 5
        assert f.chat.describe() == {
            "type": "discovered",
            "cold": False,
            "role": "chat",
            "strategy": "random",
            "fresh_nodes": 1,
            "stale_nodes": 1,
            "ejected_nodes": 1,
            "draining_nodes": 0,
        }
        assert f.chat.available() == (True, "ok")

    run(go())


# -- whose fault: the client's errors pass through; only the node's fail over -----------------------
LLAMA_500 = {"error": {"code": 500, "message": "image input is not supported", "type": "server_error"}}
LLAMA_501 = {
    "error": {
        "code": 501,
        "message": "This server does not support embeddings.",
        "type": "not_supported_error",
    }
}


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (
            400,
            {"error": {"code": 400, "message": "exceed_context_size_error", "type": "invalid_request_error"}},
        ),
        (404, {"error": {"message": "File Not Found"}}),
        (500, LLAMA_500),
        (501, LLAMA_501),
    ],
)
def test_a_client_error_is_relayed_as_it_came_never_retried_nor_held_against_the_node(
    status: int, body: dict[str, Any]
) -> None:
    async def go() -> None:
        f = Fleet()
        a, b = await f.add("a"), await f.add("b")
        f.client.on(url("a"), Reply.json(status, body))
        f.client.on(url("b"), Reply.json(status, body))
        for _ in range(10):  # far more than eject_after_failures (2)
            sent = await send_one(f.chat)
            assert sent.status == status and sent.json() == body
        assert len(f.client.calls) == 10  # one attempt each, never a second node
        assert f.state(a) == f.state(b) == "fresh"
        assert a.failures == b.failures == 0

    run(go())


@pytest.mark.parametrize("status", [502, 503, 504])
def test_a_node_that_says_it_is_unwell_fails_over_and_counts(status: int) -> None:
    async def go() -> None:
        f = Fleet()
        a = await f.add("a")
        await f.add("b")
        f.client.on(url("a"), Reply.json(status, {"error": {"code": status, "message": "Loading model"}}))
        f.client.on(url("b"), Reply.json(200, {"answer": "b"}))
        f.chat.strategy = _Always("a")
        sent = await send_one(f.chat)
        assert sent.status == 200 and sent.json() == {"answer": "b"}
        assert a.failures == 1

    run(go())


def test_a_500_without_an_error_body_is_the_nodes_fault() -> None:
    async def go() -> None:
        f = Fleet()
        a = await f.add("a")
        await f.add("b")
        f.client.on(url("a"), Reply(500, b"<html>Internal Server Error</html>"))
        f.client.on(url("b"), Reply.json(200, {"answer": "b"}))
        f.chat.strategy = _Always("a")
        sent = await send_one(f.chat)
        assert sent.json() == {"answer": "b"} and a.failures == 1

    run(go())


class _Always:
    """A strategy that tries ``first`` before any other eligible node."""

    def __init__(self, first: str) -> None:
        self.first = first

    def choose(self, nodes: Any, eligible: Any) -> Any:
        ordered = sorted(nodes, key=lambda n: n.node_id != self.first)
        return next((n for n in ordered if eligible(n)), None)


def test_after_an_ejection_the_node_is_on_probation() -> None:
    async def go() -> None:
        f = Fleet(make_settings(eject_max_s=25))
        a = await f.add("a")
        down = Reply.json(503, {"error": {"message": "down"}})
        f.client.on(url("a"), down)
        for _ in range(2):  # eject_after_failures: 2
            assert (await send_one(f.chat)).status == 503  # the only node: its answer is relayed
        assert f.state(a) == "ejected" and a.ejected_until == f.clock.now + 10
        beat = HeartbeatRequest(node_id="a")  # the node keeps heartbeating: never stale here
        f.clock.now += 10.5  # the ejection ends: on probation, not with a stale failure count
        await f.registry.heartbeat(beat, key_id(KEY_1))
        assert f.state(a) == "fresh" and a.failures == 0 and a.ejections == 1
        await send_one(f.chat)  # one failure on probation ejects again, for twice as long
        assert f.state(a) == "ejected" and a.ejected_until == f.clock.now + 20
        f.clock.now += 20.5
        await f.registry.heartbeat(beat, key_id(KEY_1))
        await send_one(f.chat)  # and again: 40 s, capped at eject_max_s (25)
        assert a.ejected_until == f.clock.now + 25
        f.clock.now += 25.5
        await f.registry.heartbeat(beat, key_id(KEY_1))
        f.client.on(url("a"), Reply.json(200, {"ok": True}))
        assert (await send_one(f.chat)).status == 200  # one success clears the probation
        assert a.ejections == 0 and a.failures == 0
        f.client.on(url("a"), down)
        await send_one(f.chat)
        assert f.state(a) == "fresh" and a.failures == 1  # back to the normal count

    run(go())


# -- warm before cold (models on demand) ------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["round_robin", "random", "least_busy", "cache_aware"])
def test_a_warm_node_gets_every_request_while_it_has_room(strategy: str) -> None:
    async def go() -> None:
        f = Fleet(make_settings({"strategy": strategy}))
        cold = await f.add("cold", cold_roles=["chat"])
        await f.add("warm")
        f.client.on("http://", Reply.json(200, {}))
        for n in range(20):
            assert (await send_one(f.chat, n)).status == 200
        assert f.client.urls() == [url("warm")] * 20
        assert f.chat.describe()["cold"] is False
        # The warm node leaves: the cold one serves (the client waits for its load).
        await f.registry.deregister("warm", key_id(KEY_1))
        assert f.chat.cold() is True and f.chat.available() == (True, "ok")
        await send_one(f.chat)
        assert f.client.urls()[-1] == url("cold")
        # Its heartbeat says it is warm now: nothing cold left for the role.
        await f.registry.heartbeat(HeartbeatRequest(node_id="cold", cold_roles=[]), key_id(KEY_1))
        assert cold.cold == frozenset() and not f.registry.has_cold("chat")

    run(go())


def test_a_cold_node_takes_the_request_when_every_warm_node_is_full() -> None:
    async def go() -> None:
        f = queued_fleet()
        await f.add("cold", cold_roles=["chat"], slots_total=1)
        warm = await f.add("warm", slots_total=1)
        gate = asyncio.Event()
        f.client.on("http://", Reply.json(200, {}, gate=gate))
        loop = asyncio.get_running_loop()
        first = loop.create_task(send_one(f.chat, 1))
        await wait_for(lambda: warm.inflight == 1, "the first request on the warm node")
        second = loop.create_task(send_one(f.chat, 2))
        await wait_for(lambda: len(f.client.calls) == 2, "the second request sent")
        gate.set()
        await asyncio.gather(first, second)
        assert f.client.urls() == [url("warm"), url("cold")]

    run(go())
