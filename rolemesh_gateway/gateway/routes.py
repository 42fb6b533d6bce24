"""How each alias is served: a fixed upstream, or the registered nodes of a role.

Both kinds of route have the same small interface: :meth:`Route.available` (can it serve now,
and if not, why) and :meth:`Route.forward` (send one request, relay the answer), so nothing
above this module asks which kind it has.

Every failure has an owner. An answer that says the *request* was bad (any 4xx, and a 500 or
501 that carries an error body, which is how llama-server refuses an image sent to a text
model or embeddings asked of a chat server) is the client's: it is relayed as it came, never
retried, and never held against the node. What says the *node* is unwell is the node's:
refused or broken connections, timeouts, 502/503/504 (llama-server's 503 "loading model"
included), or a 5xx without an error body. A discovered route then tries the next node, as long
as nothing has reached the client, and passive health ejects a node after
``nodes.eject_after_failures`` such failures in a row. When its ejection ends, the node is on
probation: one success clears it, one failure ejects it again for twice as long (up to
``nodes.eject_max_s``). With ``least_busy``, a request that finds every node of its role at
capacity waits in a bounded FIFO queue for a free slot.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from ..common.asgi import Headers, Send
from ..common.auth import KeyRing
from ..common.config import Timeouts, bearer_header
from ..common.errors import (
    ClientStalled,
    NoUpstreamAvailable,
    QueueFull,
    QueueTimeout,
    RoleMeshError,
    StreamBroken,
    UpstreamFailed,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from ..common.http1 import Client
from ..common.logs import current_request
from ..common.protocol import NODE_KEY
from ..common.relay import is_buffered, pass_through, relay
from .cache_aware import CacheAware, CacheAwareConfig, RoutingRequest, routing_request
from .health import HealthMonitor
from .metrics import Stats
from .registry import Node, NodeRegistry
from .settings import DiscoveredModel, NodeSettings, ProxyModel, QueueSettings, Settings
from .strategies import QUEUEING, Strategy, make_strategy

log = logging.getLogger("rolemesh.routes")


@dataclass(slots=True)
class Outbound:
    """One client request as it goes upstream, built once by the inference endpoint."""

    method: str
    #: Path and query string.
    target: str
    #: The client's headers minus hop-by-hop ones and credentials, plus the request id.
    headers: Headers
    body: bytes
    #: Added to the answer the client gets (the request id).
    reply_headers: Headers
    #: An Anthropic Messages call: an in-band stream error takes that API's shape.
    anthropic: bool = False
    #: The parsed body, when the endpoint parsed one (read only by ``cache_aware``).
    data: dict[str, Any] | None = None


class Route(abc.ABC):
    """How one alias is served."""

    kind: str
    #: Does :meth:`forward` read :attr:`Outbound.data` (``cache_aware``)? Else it is not kept.
    reads_body = False

    def __init__(
        self, alias: str, rewrite_model: str | None, timeouts: Timeouts, write_timeout_s: float
    ) -> None:
        self.alias = alias
        #: The ``model`` the upstream is sent, when it differs from what the client wrote.
        self.rewrite_model = rewrite_model
        self.timeouts = timeouts
        #: A stream whose client reads nothing this long is ended (``limits.write_timeout_s``).
        self.write_timeout_s = write_timeout_s
        #: Where attempts and queue refusals are counted (set by :func:`build_routes`).
        self.stats = Stats()

    @abc.abstractmethod
    def available(self) -> tuple[bool, str]:
        """Can this alias serve a request now; if not, why (in words for the operator)."""

    @abc.abstractmethod
    async def forward(self, out: Outbound, send: Send) -> None:
        """Send ``out`` upstream and relay the answer to ``send``; raise if nothing was sent."""

    def describe(self) -> dict[str, Any]:
        """What ``/v1/models`` says about this alias beside availability."""
        return {"type": self.kind}

    def model_info(self) -> dict[str, Any] | None:
        """What the backend reports about its model (llama-server's ``meta``...), if known."""
        return None

    def cold(self) -> bool:
        """Would a request wait for a model to load (no warm node serves the alias)?"""
        return False


class FixedRoute(Route):
    """A ``type: proxy`` alias: one upstream URL, probed in the background."""

    kind = "proxy"

    def __init__(
        self,
        alias: str,
        m: ProxyModel,
        timeouts: Timeouts,
        write_timeout_s: float,
        client: Client,
        health: HealthMonitor,
    ) -> None:
        super().__init__(alias, m.upstream_model, timeouts, write_timeout_s)
        self.url = m.proxy_url
        self._client = client
        self._health = health
        self._target = f"upstream {alias} ({self.url})"
        self._auth = bearer_header(m.api_key)

    def available(self) -> tuple[bool, str]:
        return self._health.status(self.alias)

    def model_info(self) -> dict[str, Any] | None:
        return self._health.model_info(self.alias)

    async def forward(self, out: Outbound, send: Send) -> None:
        attempts = self.stats.attempts
        try:
            outcome = await pass_through(
                self._client,
                out.method,
                self.url + out.target,
                [*out.headers, *self._auth] if self._auth else out.headers,
                out.body,
                self.timeouts,
                send,
                out.reply_headers,
                self._target,
                anthropic=out.anthropic,
                write_timeout_s=self.write_timeout_s,
            )
        except UpstreamUnreachable as exc:
            attempts[(self.alias, self.alias, "connect_error")] += 1
            self._health.mark_failed(self.alias, exc.message)
            raise
        except RoleMeshError as exc:
            attempts[(self.alias, self.alias, attempt_outcome(exc))] += 1
            raise
        attempts[(self.alias, self.alias, outcome)] += 1


class WaitQueue:
    """FIFO of requests waiting for a free slot on a role; bounded in size and wait.

    One queue per role, shared by every alias of the role, since slots belong to nodes. A
    waiter is woken when a request on the role frees a slot, and looks again every
    :data:`RECHECK_S` in any case (a node joined, came back, or reported more slots), keeping
    its place in the line.
    """

    def __init__(self, settings: QueueSettings) -> None:
        self.max_size = settings.max_size
        self.max_wait_s = settings.max_wait_s
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def __len__(self) -> int:
        return len(self._waiters)

    async def wait(
        self, ticket: asyncio.Future[None] | None, deadline: float, role: str
    ) -> asyncio.Future[None]:
        """Wait for a turn; returns the ticket to pass again, and to :meth:`leave` at the end.

        Raises QueueFull when the line is full, QueueTimeout when ``deadline`` passed.
        """
        if ticket is None:
            if len(self._waiters) >= self.max_size:
                raise QueueFull(
                    f"all nodes for role '{role}' are busy and {self.max_size} requests are already "
                    "waiting (queue.max_size); retry later"
                )
            ticket = asyncio.get_running_loop().create_future()
            self._waiters.append(ticket)
        elif ticket.done():  # woken, but the slot went to someone else first: back to the head
            ticket = asyncio.get_running_loop().create_future()
            self._waiters.appendleft(ticket)
        remaining = deadline - time.monotonic()
        if remaining > 0:
            await asyncio.wait({ticket}, timeout=min(remaining, RECHECK_S))
        if not ticket.done() and time.monotonic() >= deadline:
            self.leave(ticket)
            raise QueueTimeout(
                f"waited {self.max_wait_s:g}s for a free slot on role '{role}' (queue.max_wait_s); "
                "all nodes stayed busy"
            )
        return ticket

    def leave(self, ticket: asyncio.Future[None] | None) -> None:
        """Give up a place in the line (served, failed, or the client left)."""
        if ticket is None:
            return
        if not ticket.done():
            ticket.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(ticket)

    def wake_one(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return


#: How often a queued request looks again for a node with room, even if no slot was freed.
RECHECK_S = 1.0


class PassiveHealth:
    """Judges nodes by real traffic: ejection after failures in a row, then probation."""

    def __init__(self, settings: NodeSettings, clock: Any = time.time) -> None:
        self.eject_after = settings.eject_after_failures
        self.eject_for_s = settings.eject_for_s
        self.eject_max_s = settings.eject_max_s
        self._clock = clock

    def failed(self, node: Node, err: RoleMeshError) -> None:
        now = self._clock()
        if node.ejected_until > now:  # out already: requests that were in flight add nothing
            return
        if node.ejections:  # on probation after an ejection: one failure is enough, and longer
            self._eject(node, now, self.eject_for_s * 2**node.ejections, err)
            return
        node.failures += 1
        if node.failures >= self.eject_after:
            self._eject(node, now, self.eject_for_s, err)

    def _eject(self, node: Node, now: float, for_s: float, err: RoleMeshError) -> None:
        for_s = min(for_s, self.eject_max_s)
        node.ejected_until = now + for_s
        node.ejections += 1
        node.failures = 0
        log.warning(
            "node %s ejected for %.0fs (ejection %d in a row; last failure: %s)",
            node.node_id,
            for_s,
            node.ejections,
            err.message,
        )

    def succeeded(self, node: Node) -> None:
        node.failures = 0
        if node.ejections:
            log.info("node %s is serving again; off probation", node.node_id)
            node.ejections = 0


#: Why ``cache_aware`` chose a node that holds the conversation (see :meth:`DiscoveredRoute._pick`).
HOLDS = frozenset({"prefix", "session"})

#: Answers that say the node cannot serve now (llama-server's 503 while it loads a model).
NODE_UNWELL = frozenset({502, 503, 504})


def attempt_outcome(exc: RoleMeshError) -> str:
    """How a failed attempt is counted in ``rolemesh_upstream_attempts_total``."""
    if isinstance(exc, UpstreamUnreachable):
        return "connect_error"
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    return "broken"


def is_error_body(body: bytes) -> bool:
    """Does a 5xx body explain itself (llama-server's ``{"error": {...}}``)? Then it is about the request."""
    if body[:1] != b"{":
        return False
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(data, dict) and isinstance(data.get("error"), dict | str)


@dataclass(slots=True)
class Retry:
    """Nothing reached the client: the next node may try."""

    error: RoleMeshError


#: The answer (or its in-band error, after the first byte) reached the client: stop here.
DONE = None
Outcome = Retry | None


class DiscoveredRoute(Route):
    """A ``type: discovered`` alias: the fresh nodes that registered its role."""

    kind = "discovered"
    #: ``nodes.verify_server_names``: a node's https certificate must name its node_id.
    server_names = False

    def __init__(
        self,
        alias: str,
        m: DiscoveredModel,
        timeouts: Timeouts,
        write_timeout_s: float,
        queue: WaitQueue | None,
        client: Client,
        registry: NodeRegistry,
        node_keys: KeyRing,
        passive: PassiveHealth,
        allow: Callable[[str], bool] | None = None,
        strategy: Strategy | None = None,
    ) -> None:
        super().__init__(alias, m.role, timeouts, write_timeout_s)
        self.role = m.role
        self.strategy_name = m.strategy
        self.strategy: Strategy = strategy or make_strategy(m.strategy, lambda n: n.load())  # type: ignore[attr-defined]
        #: The strategy, when it routes by what the request says and learns from what was served.
        self._cache = self.strategy if isinstance(self.strategy, CacheAware) else None
        self.reads_body = self._cache is not None
        self.max_attempts = m.max_attempts
        self.queue = queue
        self._client = client
        self._registry = registry
        self._node_keys = node_keys
        self._passive = passive
        #: Which addresses a node's URL may resolve to (``nodes.allowed_networks``).
        self._allow = allow

    # -- availability ---------------------------------------------------------------------
    def available(self) -> tuple[bool, str]:
        registry = self._registry
        now = registry.clock()
        nodes = registry.nodes_for_role(self.role)
        if any(registry.usable(n, now) for n in nodes):
            return True, "ok"
        if not nodes:
            return False, f"no node has registered role '{self.role}'"
        return False, f"no fresh node serves role '{self.role}' ({len(nodes)} stale, ejected or draining)"

    def model_info(self) -> dict[str, Any] | None:
        registry = self._registry
        now = registry.clock()
        for node in registry.nodes_for_role(self.role):
            if node.models and self.role in node.models and registry.usable(node, now):
                return node.models[self.role]
        return None

    def cold(self) -> bool:
        registry = self._registry
        if not registry.has_cold(self.role):
            return False
        now = registry.clock()
        role = self.role
        return not any(role not in n.cold and registry.usable(n, now) for n in registry.nodes_for_role(role))

    def describe(self) -> dict[str, Any]:
        counts = self._registry.count_for_role(self.role)
        return {
            "type": self.kind,
            "cold": self.cold(),
            "role": self.role,
            "strategy": self.strategy_name,
            "fresh_nodes": counts["fresh"],
            "stale_nodes": counts["stale"],
            "ejected_nodes": counts["ejected"],
            "draining_nodes": counts["draining"],
        }

    # -- forwarding -----------------------------------------------------------------------
    async def forward(self, out: Outbound, send: Send) -> None:
        tried: list[Node] = []
        deadline = time.monotonic() + (self.queue.max_wait_s if self.queue is not None else 0.0)
        last: RoleMeshError | None = None
        cache = self._cache
        request = (
            routing_request(out.data, out.headers, cache.config.block_chars) if cache is not None else None
        )
        for attempt in range(1, self.max_attempts + 1):
            try:
                node = await self._pick(tried, deadline, request)
            except NoUpstreamAvailable:
                if last is not None:  # the real reason is what the nodes tried said
                    raise last from None
                raise
            tried.append(node)
            final = attempt == self.max_attempts or not self._others_left(tried)
            outcome = await self._try(node, out, send, final, request)
            if outcome is DONE:
                return
            last = outcome.error
            log.info("attempt %d for %s on %s failed: %s", attempt, self.alias, node.node_id, last.message)
        assert last is not None
        raise last

    async def _try(
        self, node: Node, out: Outbound, send: Send, final: bool, request: RoutingRequest | None = None
    ) -> Outcome:
        """One attempt on one node; the module docstring says whose fault an answer is."""
        headers = out.headers
        key = self._node_keys.key(node.key_id) if node.key_id is not None else None
        if key is not None:
            headers = [*headers, (NODE_KEY, key)]
        target = f"node {node.node_id} ({node.base_url})"
        req = current_request.get()
        if req is not None:
            req.node = node.node_id
        attempts = self.stats.attempts
        with self._slot(node):
            try:
                resp = await self._client.open(
                    out.method,
                    node.base_url + out.target,
                    headers,
                    out.body,
                    self.timeouts,
                    target,
                    self._allow,
                    node.node_id if self.server_names else None,
                )
            except RoleMeshError as exc:
                attempts[(self.alias, node.node_id, attempt_outcome(exc))] += 1
                self._passive.failed(node, exc)
                return Retry(exc)
            except Exception as exc:  # a bug or a surprise on the way out: still the node's turn to fail
                log.exception("unexpected error sending to %s", target)
                err = UpstreamFailed(f"{target}: unexpected error ({exc.__class__.__name__})")
                attempts[(self.alias, node.node_id, "broken")] += 1
                self._passive.failed(node, err)
                return Retry(err)
            try:
                status = resp.status
                body = None
                nodes_fault = status in NODE_UNWELL
                if status >= 500 and not nodes_fault:
                    if is_buffered(resp):  # small: read it to see whether it explains itself
                        body = await resp.read()
                        nodes_fault = not is_error_body(body)
                    else:
                        nodes_fault = True
                if nodes_fault:
                    err = UpstreamFailed(f"{target} answered HTTP {status}")
                    self._passive.failed(node, err)
                    if not final:
                        attempts[(self.alias, node.node_id, "http_error")] += 1
                        return Retry(err)
                await relay(
                    resp,
                    send,
                    out.reply_headers,
                    target,
                    body=body,
                    anthropic=out.anthropic,
                    write_timeout_s=self.write_timeout_s,
                )
            except StreamBroken as exc:  # after the first byte: the client was told in-band
                attempts[(self.alias, node.node_id, "broken")] += 1
                self._passive.failed(node, exc.error)
                return DONE
            except ClientStalled:  # the client stopped reading: nobody else's fault
                attempts[(self.alias, node.node_id, "ok")] += 1
                return DONE
            except RoleMeshError as exc:  # the body failed before anything was sent
                attempts[(self.alias, node.node_id, attempt_outcome(exc))] += 1
                self._passive.failed(node, exc)
                return Retry(exc)
            finally:
                resp.release()
            attempts[(self.alias, node.node_id, "http_error" if status >= 500 else "ok")] += 1
            if not nodes_fault:
                self._passive.succeeded(node)
                if request is not None and status < 400 and self._cache is not None:
                    self._cache.learn(node, request)  # the node that served it now holds its prefix
            return DONE

    @contextlib.contextmanager
    def _slot(self, node: Node) -> Iterator[None]:
        """Count the request in flight on ``node``; a freed slot wakes one queued request."""
        node.inflight += 1
        try:
            yield
        finally:
            node.inflight -= 1
            if self.queue is not None and len(self.queue):
                self.queue.wake_one()

    async def _pick(self, tried: list[Node], deadline: float, request: RoutingRequest | None = None) -> Node:
        registry = self._registry
        ticket: asyncio.Future[None] | None = None
        try:
            while True:
                now = registry.clock()
                nodes = registry.nodes_for_role(self.role)

                def eligible(n: Node, now: float = now) -> bool:
                    return registry.usable(n, now) and n not in tried

                if self.queue is None:
                    node = self._choose(nodes, eligible, request)
                    if node is None:
                        raise NoUpstreamAvailable(self._none_message(tried))
                    if self._cache is not None:
                        self.stats.cache_decisions[(self.alias, self._cache.reason)] += 1
                    return node

                def has_room(n: Node) -> bool:
                    cap = n.slots_total
                    return eligible(n) and (not cap or n.inflight < cap)

                if self._cache is not None and request is not None:
                    node = self._choose(nodes, eligible, request)
                    # The node that holds the conversation takes it even when its slots are
                    # busy (llama-server queues it behind them, which costs less than the whole
                    # prompt elsewhere; the balance thresholds bound this). The least loaded
                    # node being full means every node is: wait.
                    if node is not None and not has_room(node) and self._cache.reason not in HOLDS:
                        node = None
                    if node is not None:
                        self.stats.cache_decisions[(self.alias, self._cache.reason)] += 1
                else:
                    node = self._choose(nodes, has_room, request)
                if node is not None:
                    return node
                if not any(eligible(n) for n in nodes):
                    raise NoUpstreamAvailable(self._none_message(tried))
                try:
                    ticket = await self.queue.wait(ticket, deadline, self.role)
                except QueueFull:
                    self.stats.queue_rejected[(self.alias, "full")] += 1
                    raise
                except QueueTimeout:
                    self.stats.queue_rejected[(self.alias, "timeout")] += 1
                    raise
        finally:
            if self.queue is not None:
                self.queue.leave(ticket)

    def _choose(
        self, nodes: Sequence[Node], ok: Callable[[Node], bool], request: RoutingRequest | None = None
    ) -> Node | None:
        """The strategy's choice, among nodes with the role warm first when some have it cold.

        A cold node (its model loads on demand) gets the request only when no warm node can
        take it; the check costs one dict lookup while no node has the role cold. ``request``
        only goes to a strategy that needs it (``cache_aware``).
        """
        strategy = self.strategy
        if self._registry.has_cold(self.role):
            role = self.role

            def warm(n: Node) -> bool:
                return role not in n.cold and ok(n)

            node = strategy.choose(nodes, warm) if request is None else strategy.choose(nodes, warm, request)
            if node is not None:
                return node
        if request is None:
            return strategy.choose(nodes, ok)
        return strategy.choose(nodes, ok, request)

    def _others_left(self, tried: list[Node]) -> bool:
        """Is there a node not tried yet that could take the request? (only on the failure path)"""
        registry = self._registry
        now = registry.clock()
        return any(registry.usable(n, now) and n not in tried for n in registry.nodes_for_role(self.role))

    def _none_message(self, tried: list[Node]) -> str:
        if tried:
            return (
                f"no node for role '{self.role}' could take the request "
                f"(tried {', '.join(n.node_id for n in tried)})"
            )
        return f"model '{self.alias}' has no available node: " + self.available()[1]


def build_routes(
    settings: Settings,
    client: Client,
    registry: NodeRegistry,
    health: HealthMonitor,
    node_keys: KeyRing,
    allow: Callable[[str], bool] | None = None,
    stats: Stats | None = None,
) -> dict[str, Route]:
    """One route per configured alias."""
    passive = PassiveHealth(settings.nodes, registry.clock)
    stats = stats or Stats()
    queues: dict[str, WaitQueue] = {}  # per role: the first least_busy alias of a role sets its bounds
    caches: dict[str, CacheAware] = {}  # per role: aliases of one role share one prefix map
    routes: dict[str, Route] = {}
    write_s = settings.limits.write_timeout_s
    for alias, m in settings.models.items():
        timeouts = settings.timeouts_for(alias)
        if isinstance(m, ProxyModel):
            routes[alias] = FixedRoute(alias, m, timeouts, write_s, client, health)
            routes[alias].stats = stats
        else:
            queue = None
            if m.strategy in QUEUEING:
                queue = queues.setdefault(m.role, WaitQueue(m.queue or settings.queue))
            strategy = None
            if m.strategy == "cache_aware":
                strategy = caches.get(m.role)
                if strategy is None:
                    config = CacheAwareConfig(**(m.cache_aware.model_dump() if m.cache_aware else {}))
                    strategy = caches[m.role] = CacheAware(
                        Node.load, config, inflight=lambda n: n.inflight, name=lambda n: n.node_id
                    )
            routes[alias] = route = DiscoveredRoute(
                alias, m, timeouts, write_s, queue, client, registry, node_keys, passive, allow, strategy
            )
            route.stats = stats
            route.server_names = settings.nodes.verify_server_names
    return routes
