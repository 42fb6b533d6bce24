"""Node registries, picked by ``registry.backend``: ``memory`` (one gateway) or ``redis`` (shared)."""

from __future__ import annotations

from typing import Any

from ..settings import Settings
from .base import NODE_STATES, Node, NodeRegistry, NodeState
from .memory import MemoryRegistry

__all__ = ["NODE_STATES", "MemoryRegistry", "Node", "NodeRegistry", "NodeState", "make_registry"]


def make_registry(settings: Settings) -> NodeRegistry:
    """Build the registry back-end named by ``registry.backend``."""
    common: dict[str, Any] = {
        "stale_after_s": settings.nodes.stale_after_s,
        "evict_after_s": settings.nodes.evict_after_s,
        "max_nodes": settings.nodes.max_nodes,
        "max_nodes_per_key": settings.nodes.max_nodes_per_key,
    }
    r = settings.registry
    if r.backend == "redis":
        from .redis import RedisRegistry

        assert r.redis_url is not None
        return RedisRegistry(
            url=r.redis_url, prefix=r.key_prefix, sync_interval_s=r.sync_interval_s, **common
        )
    return MemoryRegistry(**common)
