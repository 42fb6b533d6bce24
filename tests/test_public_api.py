"""The public API is what rolemesh_gateway exports; changing it must be deliberate."""

import subprocess
import sys

import rolemesh_gateway

PUBLIC = [
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


def test_public_api_is_locked() -> None:
    assert sorted(rolemesh_gateway.__all__) == PUBLIC
    for name in rolemesh_gateway.__all__:
        assert hasattr(rolemesh_gateway, name)
    # Nothing public beyond __all__ (the sub-packages and dunders aside), as httpx checks.
    extra = {n for n in vars(rolemesh_gateway) if not n.startswith("_")} - set(PUBLIC)
    assert extra <= {"annotations", "common", "gateway", "agent", "main", "TYPE_CHECKING", "Any"}, extra


def test_gateway_error_is_the_base_of_every_answer_error() -> None:
    assert rolemesh_gateway.GatewayError is rolemesh_gateway.RoleMeshError


def test_importing_the_package_loads_no_gateway_code() -> None:
    """The exports are lazy: ``import rolemesh_gateway`` alone must not build the gateway."""
    code = "import sys, rolemesh_gateway; print(sorted(m for m in sys.modules if m.startswith('rolemesh')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "rolemesh_gateway.gateway" not in out and "rolemesh_gateway.gateway.app" not in out
