"""The node registry's interface: which nodes exist, what roles they serve, when they checked in.

Writes are ``async`` so that a shared store can sit behind them; reads on the request path are
synchronous lookups in local memory. One rule decides a node's state, used by routing,
``/v1/models`` and ``/v1/nodes`` alike (:meth:`NodeRegistry.state`): *stale* when it has not
heartbeaten for ``stale_after_s``, else *ejected* while passive health has it cooling down,
else *draining* when an operator (or the node itself) took it out of rotation, else *fresh*;
only fresh nodes take traffic.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ...common.errors import NodeOwnedElsewhere
from ...common.protocol import HeartbeatRequest, Load, RegisterRequest

NodeState = Literal["fresh", "stale", "ejected", "draining"]
NODE_STATES: tuple[NodeState, ...] = ("fresh", "stale", "ejected", "draining")


@dataclass(slots=True, eq=False)
class Node:
    """One registered node, plus this gateway's own view of it (in-flight, failures)."""

    node_id: str
    base_url: str
    roles: tuple[str, ...]
    #: Id of the node key it registered with (:func:`~rolemesh_gateway.common.auth.key_id`).
    key_id: str | None
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
    #: Ejections in a row without a success since (0: in good standing; >0: on probation).
    ejections: int = 0
    #: Per role, what its server reports about its model (llama-server's ``meta`` ...).
    models: dict[str, dict[str, Any]] | None = None
    #: Taken out of rotation (``POST /v1/nodes/{id}/drain``): requests in flight finish, no new ones.
    draining: bool = False
    #: Roles served on demand whose server is not running now (a request waits for a load);
    #: kept by :meth:`NodeRegistry.set_cold`, which counts them per role.
    cold: frozenset[str] = frozenset()

    def reset_health(self) -> None:
        """A clean slate: registered again, or back from stale."""
        self.failures, self.ejected_until, self.ejections = 0, 0.0, 0

    def apply_load(self, load: Load) -> None:
        if load.slots_total is not None:
            self.slots_total = load.slots_total
        if load.slots_busy is not None:
            self.slots_busy = load.slots_busy
        if load.inflight is not None:
            self.reported_inflight = load.inflight

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
        max_nodes_per_key: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.stale_after_s = stale_after_s
        self.evict_after_s = evict_after_s
        self.max_nodes = max_nodes
        self.max_nodes_per_key = max_nodes_per_key
        self.clock = clock
        #: Per role, how many nodes have it cold (absent: none), so that routing asks for warm
        #: nodes first only where a cold one exists.
        self._cold_count: dict[str, int] = {}

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
    async def register(self, req: RegisterRequest, key_id: str | None) -> tuple[Node, bool]:
        """Add or update a node; returns it and whether it is new.

        A node belongs to the key that registered it first (until it is evicted or
        deregistered): another key gets NodeOwnedElsewhere. Raises RegistryFull at
        ``max_nodes`` (or ``max_nodes_per_key`` for that key).
        """

    @abc.abstractmethod
    async def heartbeat(self, req: HeartbeatRequest, key_id: str | None = None) -> Node | None:
        """Mark a node fresh and store its load; ``None`` if the node is unknown."""

    @abc.abstractmethod
    async def deregister(self, node_id: str, key_id: str | None = None) -> bool:
        """Remove a node; False if it was not registered."""

    async def set_draining(self, node_id: str, draining: bool) -> Node | None:
        """Take a node out of rotation (or put it back); None if it is not registered."""
        node = self.get(node_id)
        if node is not None:
            node.draining = draining
        return node

    def get(self, node_id: str) -> Node | None:
        return next((n for n in self.all_nodes() if n.node_id == node_id), None)

    @abc.abstractmethod
    async def sweep(self) -> list[str]:
        """Evict nodes stale for longer than ``evict_after_s``; returns their ids."""

    @abc.abstractmethod
    def nodes_for_role(self, role: str) -> Sequence[Node]:
        """All registered nodes with ``role``, in any state (routing asks :meth:`usable`)."""

    @abc.abstractmethod
    def all_nodes(self) -> list[Node]: ...

    @staticmethod
    def check_owner(node_id: str, owner: str | None, key_id: str | None) -> None:
        """Refuse a write to a node under another key than the one it registered with."""
        if owner != key_id:
            raise NodeOwnedElsewhere(
                f"node '{node_id}' was registered with another node key; only that key may change it "
                "(or wait until it is evicted)"
            )

    def set_cold(self, node: Node, roles: Iterable[str]) -> None:
        """Record which of the node's roles are cold (loaded on demand, not running now)."""
        new = frozenset(roles).intersection(node.roles)
        old = node.cold
        if new == old:
            return
        counts = self._cold_count
        for role in old - new:
            left = counts.get(role, 0) - 1
            if left > 0:
                counts[role] = left
            else:
                counts.pop(role, None)
        for role in new - old:
            counts[role] = counts.get(role, 0) + 1
        node.cold = new

    def has_cold(self, role: str) -> bool:
        """Does any registered node have ``role`` cold? (one dict lookup: the request path asks)"""
        return role in self._cold_count

    def is_stale(self, node: Node, now: float) -> bool:
        """No heartbeat for ``stale_after_s``: no traffic, but still listed."""
        return now - node.last_seen >= self.stale_after_s

    def state(self, node: Node, now: float) -> NodeState:
        """The one freshness rule (see the module docstring)."""
        if self.is_stale(node, now):
            return "stale"
        if node.ejected_until > now:
            return "ejected"
        if node.draining:
            return "draining"
        return "fresh"

    def usable(self, node: Node, now: float) -> bool:
        """May this node take traffic now? (fresh, and not ejected)"""
        return not self.is_stale(node, now) and node.ejected_until <= now and not node.draining

    def count_for_role(self, role: str) -> dict[NodeState, int]:
        """How many nodes of a role are in each state."""
        now = self.clock()
        counts: dict[NodeState, int] = dict.fromkeys(NODE_STATES, 0)
        for node in self.nodes_for_role(role):
            counts[self.state(node, now)] += 1
        return counts
