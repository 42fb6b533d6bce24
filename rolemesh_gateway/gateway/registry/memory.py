"""The node registry held in this process: one gateway, and the local view of a shared one.

It keeps a per-role tuple of nodes that is rebuilt only when membership changes, so routing
stays O(1) however many nodes heartbeat.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...common.errors import RegistryFull
from ...common.protocol import HeartbeatRequest, RegisterRequest
from .base import Node, NodeRegistry


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
        key_id: str | None,
        version: str | None,
        models: dict[str, dict[str, Any]] | None,
        last_seen: float,
    ) -> tuple[Node, bool]:
        node = self._nodes.get(node_id)
        if node is None:
            node = Node(
                node_id, base_url, roles, key_id, last_seen, last_seen, version=version, models=models
            )
            self._nodes[node_id] = node
            self._index(node)
            return node, True
        if node.roles != roles:
            self._unindex(node)
            node.roles = roles
            self._index(node)
            self.set_cold(node, node.cold)  # a role it no longer has is not cold either
        node.base_url, node.key_id, node.version, node.models = base_url, key_id, version, models
        node.last_seen = max(node.last_seen, last_seen)
        return node, False

    def _drop(self, node_id: str) -> bool:
        node = self._nodes.pop(node_id, None)
        if node is None:
            return False
        self._unindex(node)
        self.set_cold(node, ())
        return True

    async def register(self, req: RegisterRequest, key_id: str | None) -> tuple[Node, bool]:
        known = self._nodes.get(req.node_id)
        if known is not None:
            self.check_owner(req.node_id, known.key_id, key_id)
        else:
            if len(self._nodes) >= self.max_nodes:
                raise RegistryFull(f"the registry is full ({self.max_nodes} nodes)")
            quota = self.max_nodes_per_key
            if quota is not None and sum(1 for n in self._nodes.values() if n.key_id == key_id) >= quota:
                raise RegistryFull(
                    f"this node key has registered {quota} nodes already (nodes.max_nodes_per_key)"
                )
        return self._registered(req, key_id, self.clock())

    def _registered(self, req: RegisterRequest, key_id: str | None, now: float) -> tuple[Node, bool]:
        """Apply an accepted registration locally: upsert, clean health slate, load."""
        roles = tuple(dict.fromkeys(req.roles))
        node, new = self._upsert(req.node_id, req.base_url, roles, key_id, req.version, req.models, now)
        node.reset_health()
        node.apply_load(req)
        self.set_cold(node, req.cold_roles or ())
        return node, new

    async def heartbeat(self, req: HeartbeatRequest, key_id: str | None = None) -> Node | None:
        node = self._nodes.get(req.node_id)
        if node is None:
            return None
        self.check_owner(req.node_id, node.key_id, key_id)
        self._touch(node, self.clock())
        node.apply_load(req)
        if req.cold_roles is not None:
            self.set_cold(node, req.cold_roles)
        return node

    def _touch(self, node: Node, seen: float) -> None:
        if self.is_stale(node, seen):
            # Back from the dead (partition healed, box rebooted): forget old failures.
            node.reset_health()
        node.last_seen = max(node.last_seen, seen)

    async def deregister(self, node_id: str, key_id: str | None = None) -> bool:
        node = self._nodes.get(node_id)
        if node is None:
            return False
        self.check_owner(node_id, node.key_id, key_id)
        return self._drop(node_id)

    async def sweep(self) -> list[str]:
        limit = self.clock() - self.evict_after_s
        gone = [nid for nid, n in self._nodes.items() if n.last_seen < limit]
        for nid in gone:
            self._drop(nid)
        return gone

    def get(self, node_id: str) -> Node | None:
        return self._nodes.get(node_id)

    def nodes_for_role(self, role: str) -> Sequence[Node]:
        return self._by_role.get(role, ())

    def all_nodes(self) -> list[Node]:
        return list(self._nodes.values())
