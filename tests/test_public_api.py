"""The public API is what rolemesh_gateway exports; changing it must be deliberate."""

import rolemesh_gateway


def test_public_api_is_locked() -> None:
    assert sorted(rolemesh_gateway.__all__) == [
        "ConfigError",
        "Gateway",
        "GatewayError",
        "Settings",
        "__version__",
        "create_app",
        "load_settings",
        "parse_settings",
    ]
    for name in rolemesh_gateway.__all__:
        assert hasattr(rolemesh_gateway, name)
