"""Config parsing: the guide's file loads; every mistake is one clear line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from rolemesh_gateway.common.config import is_loopback
from rolemesh_gateway.common.errors import ConfigError
from rolemesh_gateway.gateway.settings import DiscoveredModel, ProxyModel, load_settings, parse_settings

ROOT = Path(__file__).resolve().parent.parent


def base(**models: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "default_model": "p",
        "models": models or {"p": {"type": "proxy", "proxy_url": "http://127.0.0.1:8011"}},
    }


def error(data: Any, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_settings(data, source="cfg.yaml", env=env or {})
    message = str(exc.value)
    assert "\n" not in message and message.startswith("cfg.yaml")
    return message


def test_guide_config_loads_with_defaults() -> None:
    s = load_settings(ROOT / "configs" / "models.yaml", env={})
    assert s.default_model == "planner"
    assert s.auth.client_api_keys == ("change-me-client-key",)
    planner = s.models["planner"]
    assert isinstance(planner, ProxyModel) and planner.proxy_url == "http://127.0.0.1:8011"
    assert s.nodes.stale_after_s == 30.0
    assert s.timeouts.connect_s > 0 and s.limits.max_body_bytes > 0


def test_settings_are_frozen() -> None:
    s = parse_settings(base(), env={})
    with pytest.raises(ValidationError):
        s.default_model = "x"  # type: ignore[misc]


def test_env_expansion_and_stale_override() -> None:
    data = base()
    data["auth"] = {"client_api_keys": ["${CLIENT_KEY}"], "node_api_keys": ["${NODE_KEY:-fallback}"]}
    s = parse_settings(data, env={"CLIENT_KEY": "secret", "ROLE_MESH_NODE_STALE_AFTER_S": "2.5"})
    assert s.auth.client_api_keys == ("secret",)
    assert s.auth.node_api_keys == ("fallback",)
    assert s.nodes.stale_after_s == 2.5


def test_missing_env_variable_is_named() -> None:
    data = base()
    data["auth"] = {"client_api_keys": ["${NOPE}"]}
    assert "auth.client_api_keys[0]: environment variable NOPE is not set" in error(data)


@pytest.mark.parametrize("value", ["abc", "0", "-1"])
def test_bad_stale_env(value: str) -> None:
    with pytest.raises(ConfigError, match="ROLE_MESH_NODE_STALE_AFTER_S"):
        parse_settings(base(), env={"ROLE_MESH_NODE_STALE_AFTER_S": value})


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({**base(), "extra": 1}, "extra: unknown key; allowed here: version, default_model"),
        ({**base(), "version": 2}, "version: got 2"),
        ({**base(), "default_model": "zz"}, "default_model 'zz' names no alias; allowed: p"),
        (base(p={"type": "proxy", "proxy_url": "ftp://x"}), "models.p.proxy_url: 'ftp://x' must be an http"),
        (base(p={"type": "proxy"}), "models.p.proxy_url: required key is missing"),
        (base(p={"type": "magic"}), "models.p.type: got 'magic'; allowed: proxy, discovered"),
        (
            base(p={"type": "discovered", "role": "w", "strategy": "fastest"}),
            "models.p.strategy: 'fastest' is not a known strategy; allowed: round_robin, random, least_busy",
        ),
        (base(p={"type": "discovered", "role": "bad role"}), "models.p.role: 'bad role' must be"),
        (
            {**base(), "auth": {"client_keys": []}},
            "auth.client_keys: unknown key; allowed here: client_api_keys",
        ),
        (
            {**base(), "auth": {"client_api_keys": ["k"], "node_api_keys": ["k"]}},
            "both a node key and a client or admin key",
        ),
        ({**base(), "timeouts": {"connect_s": 0}}, "timeouts.connect_s: got 0"),
        ({**base(), "models": {}}, "models:"),
        ([1, 2], "must be a YAML mapping"),
    ],
)
def test_bad_configs_name_the_key_path(data: Any, expected: str) -> None:
    assert expected in error(data)


def test_duplicate_advertised_names_rejected() -> None:
    data = base(
        p={"type": "proxy", "proxy_url": "http://a"},
        q={"type": "proxy", "proxy_url": "http://b", "openai_model_name": "p"},
    )
    assert "model name 'p' is used by both 'p' and 'q'" in error(data)


def test_discovered_defaults_and_per_alias_timeouts() -> None:
    data = base(p={"type": "discovered", "role": "writer", "timeouts": {"first_byte_s": 7}})
    s = parse_settings(data, env={})
    m = s.models["p"]
    assert isinstance(m, DiscoveredModel) and m.strategy == "round_robin"
    assert s.timeouts_for("p").first_byte_s == 7
    assert s.timeouts_for("p").connect_s == s.timeouts.connect_s


def test_load_errors_for_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "missing.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nmodels: [\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_settings(bad, env={})
    with pytest.raises(ConfigError, match="ROLE_MESH_CONFIG"):
        load_settings(None, env={})


@pytest.mark.parametrize(
    ("host", "loop"),
    [
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("192.168.1.4", False),
        ("example.org", False),
    ],
)
def test_is_loopback(host: str, loop: bool) -> None:
    assert is_loopback(host) is loop
