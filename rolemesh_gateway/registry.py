"""The node registry: which nodes exist, what roles they serve, when they last checked in.

:class:`NodeRegistry` is the interface (writes are ``async`` so that a shared store can sit
behind it; reads on the request path are synchronous lookups in local memory). The in-memory
implementation keeps a per-role tuple of nodes that is rebuilt only when membership changes,
so routing stays O(1) however many nodes heartbeat.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .protocol import HeartbeatRequest, Load, RegisterRequest
from .settings import Settings


class RegistryFull(Exception):
    """The registry holds ``max_nodes`` nodes already."""


@dataclass(slots=True, eq=False)
class Node:
    """One registered node, plus this gateway's own view of it (in-flight, failures)."""

    node_id: str
    base_url: str
    roles: tuple[str, ...]
    key_index: int
    registered_at: float
    last_seen: float
    slots_total: int | None = None
    slots_busy: int | None = None
    reported_inflight: int | None = None
    version: str | None = None
    # Gateway-local state, never shared: requests in flight from here, passive health.
    inflight: int = 0
    failures: int = 0
    ejected_until: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)

    def apply_load(self, load: Load) -> None:
        if load.slots_total is not None:
            self.slots_total = load.slots_total
        if load.slots_busy is not None:
            self.slots_busy = load.slots_busy
        if load.inflight is not None:
            self.reported_inflight = load.inflight

    def capacity(self) -> int | None:
        """How many requests the node can run at once, if it told us."""
        return self.slots_total or None

    def load(self) -> float:
        """Fraction of capacity in use, as seen from this gateway (lower is better)."""
        cap = self.slots_total
        if cap:
            return self.inflight / cap
        return float(self.inflight)


class NodeRegistry(abc.ABC):
    """Interface of a node registry. Writes are async; reads are local and synchronous."""

    def __init__(
        self,
        *,
        stale_after_s: float,
        evict_after_s: float,
        max_nodes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.stale_after_s = stale_after_s
        self.evict_after_s = evict_after_s
        self.max_nodes = max_nodes
        self.clock = clock

    #: How often :meth:`sync` should run; ``None`` when the registry is local only.
    sync_interval_s: float | None = None

    async def start(self) -> None:
        """Connect and load the shared state (nothing to do for a local registry)."""
        return None

    async def close(self) -> None:
        """Release connections (nothing to do for a local registry)."""
        return None

    async def sync(self) -> None:
        """Refresh the local view from the shared store (nothing to do for a local registry)."""
        return None

    @abc.abstractmethod
    async def register(self, req: RegisterRequest, key_index: int) -> tuple[Node, bool]:
        """Add or update a node; returns it and whether it is new. Raises RegistryFull."""

    @abc.abstractmethod
    async def heartbeat(self, req: HeartbeatRequest) -> Node | None:
        """Mark a node fresh and store its load; ``None`` if the node is unknown."""

    @abc.abstractmethod
    async def deregister(self, node_id: str) -> bool:
        """Remove a node; False if it was not registered."""

    @abc.abstractmethod
    async def sweep(self) -> list[str]:
        """Evict nodes stale for longer than ``evict_after_s``; returns their ids."""

    @abc.abstractmethod
    def nodes_for_role(self, role: str) -> Sequence[Node]:
        """All registered nodes with ``role``, fresh or not (callers filter with is_fresh)."""

    @abc.abstractmethod
    def all_nodes(self) -> list[Node]: ...

    def get(self, node_id: str) -> Node | None:
        return next((n for n in self.all_nodes() if n.node_id == node_id), None)

    def is_fresh(self, node: Node, now: float | None = None) -> bool:
        return ((self.clock() if now is None else now) - node.last_seen) < self.stale_after_s

    def count_for_role(self, role: str) -> tuple[int, int]:
        """``(fresh, stale)`` node counts for a role."""
        now = self.clock()
        nodes = self.nodes_for_role(role)
        fresh = sum(1 for n in nodes if self.is_fresh(n, now))
        return fresh, len(nodes) - fresh


class MemoryRegistry(NodeRegistry):
    """A registry held in this process (one gateway); also the local view of shared ones."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._nodes: dict[str, Node] = {}
        self._by_role: dict[str, tuple[Node, ...]] = {}

    # Index upkeep is incremental: tuples are copied per role touched, never rebuilt whole,
    # so registering 10,000 nodes stays cheap and readers always see a consistent tuple.
    def _index(self, node: Node) -> None:
        for role in node.roles:
            self._by_role[role] = (*self._by_role.get(role, ()), node)

    def _unindex(self, node: Node) -> None:
        for role in node.roles:
            left = tuple(n for n in self._by_role.get(role, ()) if n is not node)
            if left:
                self._by_role[role] = left
            else:
                self._by_role.pop(role, None)

    def _upsert(
        self,
        node_id: str,
        base_url: str,
        roles: tuple[str, ...],
        key_index: int,
        version: str | None,
        last_seen: float,
    ) -> tuple[Node, bool]:
        node = self._nodes.get(node_id)
        if node is None:
            node = Node(node_id, base_url, roles, key_index, last_seen, last_seen, version=version)
            self._nodes[node_id] = node
            self._index(node)
            return node, True
        if node.roles != roles:
            self._unindex(node)
            node.roles = roles
            self._index(node)
        node.base_url, node.key_index, node.version = base_url, key_index, version
        node.last_seen = max(node.last_seen, last_seen)
        return node, False

    def _drop(self, node_id: str) -> bool:
        node = self._nodes.pop(node_id, None)
        if node is None:
            return False
        self._unindex(node)
        return True

    async def register(self, req: RegisterRequest, key_index: int) -> tuple[Node, bool]:
        if req.node_id not in self._nodes and len(self._nodes) >= self.max_nodes:
            raise RegistryFull(f"the registry is full ({self.max_nodes} nodes)")
        node, new = self._upsert(
            req.node_id, req.base_url, tuple(dict.fromkeys(req.roles)), key_index, req.version, self.clock()
        )
        node.failures, node.ejected_until = 0, 0.0
        node.apply_load(req)
        return node, new

    async def heartbeat(self, req: HeartbeatRequest) -> Node | None:
        node = self._nodes.get(req.node_id)
        if node is None:
            return None
        self._touch(node, self.clock())
        node.apply_load(req)
        return node

    def _touch(self, node: Node, seen: float) -> None:
        if not self.is_fresh(node, seen):
            # Back from the dead (partition healed, box rebooted): forget old failures.
            node.failures, node.ejected_until = 0, 0.0
        node.last_seen = max(node.last_seen, seen)

    async def deregister(self, node_id: str) -> bool:
        return self._drop(node_id)

    async def sweep(self) -> list[str]:
        limit = self.clock() - self.evict_after_s
        gone = [nid for nid, n in self._nodes.items() if n.last_seen < limit]
        for nid in gone:
            self._drop(nid)
        return gone

    def nodes_for_role(self, role: str) -> Sequence[Node]:
        return self._by_role.get(role, ())

    def all_nodes(self) -> list[Node]:
        return list(self._nodes.values())

    def get(self, node_id: str) -> Node | None:
        return self._nodes.get(node_id)


def make_registry(settings: Settings) -> NodeRegistry:
    """Build the registry back-end named by ``registry.backend``."""
    common: dict[str, Any] = {
        "stale_after_s": settings.nodes.stale_after_s,
        "evict_after_s": settings.nodes.evict_after_s,
        "max_nodes": settings.nodes.max_nodes,
    }
    r = settings.registry
    if r.backend == "redis":
        from .registry_redis import RedisRegistry

        assert r.redis_url is not None
        return RedisRegistry(
            url=r.redis_url, prefix=r.key_prefix, sync_interval_s=r.sync_interval_s, **common
        )
    return MemoryRegistry(**common)
