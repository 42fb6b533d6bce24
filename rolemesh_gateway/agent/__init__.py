"""The node agent program, run on each backend host (imports only :mod:`rolemesh_gateway.common`).

It starts and supervises ``llama-server`` processes bound to 127.0.0.1 (or points at servers
that already run), proxies ``/v1/*`` to them by role on its own port, and registers its roles
with the gateway and heartbeats with its load. Entry point: ``rolemesh-node-agent``.
"""

from __future__ import annotations

from .config import AgentConfig, load_config

__all__ = ["AgentConfig", "load_config"]
