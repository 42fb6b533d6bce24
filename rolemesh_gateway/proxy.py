"""Inference forwarding: pick a backend for an alias, send, relay, fail over.

A request is retried on another node only while nothing has reached the client (connection
refused, timeout before the response head, or a 5xx head). Nodes that keep failing are
ejected for a cool-down (passive health). With ``least_busy``, a request that finds every
node of its role at capacity waits in a bounded queue for a free slot.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass, field

from .asgi import Headers, Send
from .errors import GatewayError, NoUpstreamAvailable, QueueFull, QueueTimeout, UpstreamFailed
from .health import HealthMonitor
from .protocol import NODE_KEY
from .registry import Node, NodeRegistry
from .routing import Strategy, make_strategy
from .settings import DiscoveredModel, ProxyModel, QueueSettings, Settings, Timeouts
from .upstream import StreamBroken, UpstreamClient, UpstreamUnreachable, relay

log = logging.getLogger("rolemesh.proxy")


class WaitQueue:
    """FIFO of requests waiting for a free slot on a role; bounded in size and wait."""

    def __init__(self, settings: QueueSettings) -> None:
        self.max_size = settings.max_size
        self.max_wait_s = settings.max_wait_s
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def __len__(self) -> int:
        return len(self._waiters)

    async def wait(self, deadline: float, role: str) -> None:
        if len(self._waiters) >= self.max_size:
            raise QueueFull(
                f"all nodes for role '{role}' are busy and {self.max_size} requests are already "
                "waiting (queue.max_size); retry later"
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise QueueTimeout(self._timeout_message(role))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(remaining):
                await fut
        except TimeoutError:
            raise QueueTimeout(self._timeout_message(role)) from None
        finally:
            if not fut.done():
                fut.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(fut)

    def _timeout_message(self, role: str) -> str:
        return (
            f"waited {self.max_wait_s:g}s for a free slot on role '{role}' (queue.max_wait_s); "
            "all nodes stayed busy"
        )

    def wake_one(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return


@dataclass(eq=False)
class Route:
    """How one alias is served."""

    alias: str
    timeouts: Timeouts
    rewrite_model: str | None
    max_attempts: int
    # proxy
    url: str | None = None
    # discovered
    role: str | None = None
    strategy: Strategy | None = None
    queue: WaitQueue | None = None
    strategy_name: str = ""
    extra: dict[str, object] = field(default_factory=dict)


def build_routes(settings: Settings) -> dict[str, Route]:
    routes: dict[str, Route] = {}
    for alias, m in settings.models.items():
        t = settings.timeouts_for(alias)
        if isinstance(m, ProxyModel):
            routes[alias] = Route(alias, t, m.upstream_model, 1, url=m.proxy_url)
        else:
            assert isinstance(m, DiscoveredModel)
            strategy = make_strategy(m.strategy, lambda n: n.load())  # type: ignore[attr-defined]
            queue = WaitQueue(m.queue or settings.queue) if m.strategy == "least_busy" else None
            routes[alias] = Route(
                alias,
                t,
                m.role,
                m.max_attempts,
                role=m.role,
                strategy=strategy,
                queue=queue,
                strategy_name=m.strategy,
            )
    return routes


class Forwarder:
    """Sends one client request to a backend of its route and relays the answer."""

    def __init__(
        self, settings: Settings, client: UpstreamClient, registry: NodeRegistry, health: HealthMonitor
    ) -> None:
        self.client = client
        self.registry = registry
        self.health = health
        self.node_keys = [k.encode("latin-1") for k in settings.auth.node_api_keys]
        self.eject_after = settings.nodes.eject_after_failures
        self.eject_for_s = settings.nodes.eject_for_s

    # -- availability -------------------------------------------------------------------
    def usable(self, node: Node, now: float) -> bool:
        return now - node.last_seen < self.registry.stale_after_s and node.ejected_until <= now

    def available(self, route: Route) -> tuple[bool, str]:
        if route.url is not None:
            h = self.health.state[route.alias]
            return h.available, h.reason
        assert route.role is not None
        now = time.time()
        nodes = self.registry.nodes_for_role(route.role)
        if any(self.usable(n, now) for n in nodes):
            return True, "ok"
        if not nodes:
            return False, f"no node has registered role '{route.role}'"
        return False, f"no fresh node serves role '{route.role}' ({len(nodes)} stale or ejected)"

    # -- picking --------------------------------------------------------------------------
    async def _pick(self, route: Route, tried: list[Node], deadline: float) -> Node:
        assert route.role is not None and route.strategy is not None
        while True:
            now = time.time()
            nodes = self.registry.nodes_for_role(route.role)

            def eligible(n: Node, now: float = now) -> bool:
                return self.usable(n, now) and n not in tried

            if route.queue is None:
                node = route.strategy.choose(nodes, eligible)
                if node is None:
                    raise NoUpstreamAvailable(self._none_message(route, nodes, tried))
                return node

            def has_room(n: Node) -> bool:
                cap = n.slots_total
                return eligible(n) and (not cap or n.inflight < cap)

            node = route.strategy.choose(nodes, has_room)
            if node is not None:
                return node
            if not any(eligible(n) for n in nodes):
                raise NoUpstreamAvailable(self._none_message(route, nodes, tried))
            await route.queue.wait(deadline, route.role)

    def _none_message(self, route: Route, nodes: object, tried: list[Node]) -> str:
        if tried:
            return (
                f"no node for role '{route.role}' could take the request "
                f"(tried {', '.join(n.node_id for n in tried)})"
            )
        return f"model '{route.alias}' has no available node: " + self.available(route)[1]

    def _release(self, route: Route, node: Node) -> None:
        node.inflight -= 1
        if route.queue is not None and len(route.queue):
            route.queue.wake_one()

    def _failed(self, node: Node, err: GatewayError) -> None:
        node.failures += 1
        if node.failures >= self.eject_after:
            node.ejected_until = time.time() + self.eject_for_s
            log.warning(
                "node %s ejected for %.0fs after %d failures (last: %s)",
                node.node_id,
                self.eject_for_s,
                node.failures,
                err.message,
            )

    # -- forwarding -----------------------------------------------------------------------
    async def forward(
        self,
        route: Route,
        method: str,
        path: str,
        headers: Headers,
        body: bytes,
        send: Send,
        extra: Headers,
    ) -> None:
        if route.url is not None:
            await self._forward_fixed(route, method, path, headers, body, send, extra)
        else:
            await self._forward_discovered(route, method, path, headers, body, send, extra)

    async def _forward_fixed(
        self,
        route: Route,
        method: str,
        path: str,
        headers: Headers,
        body: bytes,
        send: Send,
        extra: Headers,
    ) -> None:
        assert route.url is not None
        target = f"{route.alias} ({route.url})"
        try:
            resp = await self.client.open(method, route.url + path, headers, body, route.timeouts, target)
        except UpstreamUnreachable as exc:
            self.health.mark_failed(route.alias, exc.message)
            raise
        try:
            await relay(resp, send, extra, target)
        except StreamBroken:
            pass
        finally:
            resp.release()

    async def _forward_discovered(
        self,
        route: Route,
        method: str,
        path: str,
        headers: Headers,
        body: bytes,
        send: Send,
        extra: Headers,
    ) -> None:
        tried: list[Node] = []
        deadline = time.monotonic() + (route.queue.max_wait_s if route.queue is not None else 0.0)
        last: GatewayError | None = None
        for attempt in range(route.max_attempts):
            try:
                node = await self._pick(route, tried, deadline)
            except NoUpstreamAvailable:
                if last is not None and not isinstance(last, NoUpstreamAvailable):
                    raise last from None
                raise
            tried.append(node)
            node_headers = headers
            if 0 <= node.key_index < len(self.node_keys):
                node_headers = [*headers, (NODE_KEY, self.node_keys[node.key_index])]
            target = f"node {node.node_id} ({node.base_url})"
            node.inflight += 1
            try:
                try:
                    resp = await self.client.open(
                        method, node.base_url + path, node_headers, body, route.timeouts, target
                    )
                except GatewayError as exc:
                    self._failed(node, exc)
                    last = exc
                    log.info(
                        "attempt %d for %s on %s failed: %s",
                        attempt + 1,
                        route.alias,
                        node.node_id,
                        exc.message,
                    )
                    continue
                try:
                    if resp.status >= 500 and attempt + 1 < route.max_attempts:
                        err = UpstreamFailed(f"{target} answered HTTP {resp.status}")
                        self._failed(node, err)
                        last = err
                        continue
                    try:
                        await relay(resp, send, extra, target)
                    except StreamBroken as exc:
                        self._failed(node, exc.error)
                        return
                    except GatewayError as exc:  # body failed before anything was sent
                        self._failed(node, exc)
                        last = exc
                        continue
                    if resp.status < 500:
                        node.failures = 0
                    return
                finally:
                    resp.release()
            finally:
                self._release(route, node)
        assert last is not None
        raise last
