"""RoleMesh Gateway: one OpenAI-compatible endpoint in front of many llama-server boxes.

The public API is re-exported here (and locked by ``tests/test_public_api.py``).
"""

from __future__ import annotations

__version__ = "0.1.0"

from .app import Gateway, create_app
from .errors import GatewayError
from .settings import ConfigError, Settings, load_settings, parse_settings

__all__ = [
    "ConfigError",
    "Gateway",
    "GatewayError",
    "Settings",
    "__version__",
    "create_app",
    "load_settings",
    "parse_settings",
]
