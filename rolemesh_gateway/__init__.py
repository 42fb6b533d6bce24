"""RoleMesh Gateway: one OpenAI-compatible endpoint in front of many llama-server boxes.

The package holds two programs and what they share::

    common/    imported by both; imports nothing from the other two
    gateway/   the gateway (rolemesh-gateway, and the guide's rolemesh_gateway.main:app)
    agent/     the node agent (rolemesh-node-agent); imports only common/

The public API is re-exported here, lazily (PEP 562), so that importing the agent never loads
the gateway; ``tests/test_public_api.py`` locks it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .common.version import __version__

if TYPE_CHECKING:
    from .common.errors import ConfigError, GatewayError, RoleMeshError
    from .gateway.app import Gateway, create_app
    from .gateway.settings import Settings, load_settings, parse_settings

__all__ = [
    "ConfigError",
    "Gateway",
    "GatewayError",
    "RoleMeshError",
    "Settings",
    "__version__",
    "create_app",
    "load_settings",
    "parse_settings",
]

_WHERE = {
    "ConfigError": "common.errors",
    "GatewayError": "common.errors",
    "RoleMeshError": "common.errors",
    "Gateway": "gateway.app",
    "create_app": "gateway.app",
    "Settings": "gateway.settings",
    "load_settings": "gateway.settings",
    "parse_settings": "gateway.settings",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{where}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
