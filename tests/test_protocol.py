"""The node protocol's wire models: what an agent may send and what the gateway accepts."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from rolemesh_gateway.common.protocol import (
    MAX_ROLES,
    NODE_KEY,
    NODE_KEY_HEADER,
    HeartbeatRequest,
    RegisterRequest,
    RegisterResponse,
)

GOOD: dict[str, Any] = {"node_id": "gpu-box-1", "base_url": "http://10.0.0.5:8091", "roles": ["chat"]}


def register(**changes: Any) -> RegisterRequest:
    return RegisterRequest.model_validate({**GOOD, **changes})


def refused(**changes: Any) -> str:
    with pytest.raises(ValidationError) as info:
        register(**changes)
    err = info.value.errors()[0]
    return ".".join(str(p) for p in err["loc"])


def test_a_minimal_registration() -> None:
    req = register()
    assert (req.node_id, req.base_url, req.roles) == ("gpu-box-1", "http://10.0.0.5:8091", ["chat"])
    assert req.inflight is None and req.slots_total is None and req.version is None


def test_unknown_fields_are_ignored_for_newer_agents() -> None:
    req = register(gpu="H100", capabilities={"vision": True})
    assert not hasattr(req, "gpu")
    assert "gpu" not in req.model_dump()
    hb = HeartbeatRequest.model_validate({"node_id": "a", "temperature_c": 71})
    assert hb.node_id == "a"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("inflight", "3"),  # a string of digits is not a number on this wire
        ("slots_total", 2.0),
        ("slots_busy", True),
        ("node_id", 7),
        ("roles", "chat"),
        ("base_url", None),
        ("version", 1),
    ],
)
def test_types_are_strict(field: str, value: object) -> None:
    assert refused(**{field: value}).startswith(field)


@pytest.mark.parametrize("field", ["inflight", "slots_total", "slots_busy"])
def test_load_figures_are_never_negative(field: str) -> None:
    assert refused(**{field: -1}) == field
    assert getattr(register(**{field: 0}), field) == 0


@pytest.mark.parametrize(
    "node_id", ["a", "gpu-box-1", "node.example.com:8091", "user@host", "A_b-9", "x" * 128]
)
def test_node_ids_accepted(node_id: str) -> None:
    assert register(node_id=node_id).node_id == node_id


@pytest.mark.parametrize("node_id", ["", "-lead", ".dot", "has space", "slash/inside", "x" * 129, "ünï"])
def test_node_ids_refused(node_id: str) -> None:
    assert refused(node_id=node_id) == "node_id"


@pytest.mark.parametrize("role", ["chat", "qwen2.5:7b", "a_b-c", "r" * 64])
def test_roles_accepted(role: str) -> None:
    assert register(roles=[role]).roles == [role]


@pytest.mark.parametrize("role", ["", "_x", "has space", "a@b", "a/b", "r" * 65])
def test_roles_refused(role: str) -> None:
    assert refused(roles=["ok", role]) == "roles.1"


def test_number_of_roles_is_bounded() -> None:
    assert refused(roles=[]) == "roles"
    assert len(register(roles=[f"r{i}" for i in range(MAX_ROLES)]).roles) == MAX_ROLES
    assert refused(roles=[f"r{i}" for i in range(MAX_ROLES + 1)]) == "roles"


def test_base_url_is_an_http_url_without_trailing_slash() -> None:
    assert register(base_url="https://node.example:443/prefix/").base_url == "https://node.example:443/prefix"
    assert register(base_url="http://[::1]:8091").base_url == "http://[::1]:8091"


@pytest.mark.parametrize(
    "url",
    [
        "10.0.0.5:8091",
        "ftp://10.0.0.5",
        "http://",
        "http://host:notaport",
        "http://host:8091/?x=1",
        "http://host#frag",
        "http://user:pw@host:1",
        "http://h/" + "p" * 2048,
    ],
)
def test_base_url_refused(url: str) -> None:
    assert refused(base_url=url) == "base_url"


def test_version_is_bounded() -> None:
    assert register(version="0.1.0").version == "0.1.0"
    assert refused(version="v" * 65) == "version"


def test_heartbeat_needs_a_valid_node_id_only() -> None:
    hb = HeartbeatRequest.model_validate({"node_id": "a", "slots_total": 4, "slots_busy": 1, "inflight": 0})
    assert (hb.slots_total, hb.slots_busy, hb.inflight) == (4, 1, 0)
    with pytest.raises(ValidationError):
        HeartbeatRequest.model_validate({"slots_total": 4})
    with pytest.raises(ValidationError):
        HeartbeatRequest.model_validate({"node_id": "no spaces please"})


def test_models_are_frozen() -> None:
    req = register()
    with pytest.raises(ValidationError):
        req.node_id = "other"  # type: ignore[misc]


def test_what_the_agent_sends_is_what_the_gateway_accepts() -> None:
    sent = RegisterRequest(node_id="a", base_url="http://h:1", roles=["x"], slots_total=2, version="9")
    wire = sent.model_dump(exclude_none=True)
    assert wire == {
        "node_id": "a",
        "base_url": "http://h:1",
        "roles": ["x"],
        "slots_total": 2,
        "version": "9",
    }
    assert RegisterRequest.model_validate(wire) == sent


def test_register_response_round_trip() -> None:
    data = {"node_id": "a", "stale_after_s": 30.0, "heartbeat_interval_hint_s": 10.0, "future": 1}
    resp = RegisterResponse.model_validate(data)
    assert resp.heartbeat_interval_hint_s == 10.0


def test_node_key_header() -> None:
    assert NODE_KEY_HEADER == "X-RoleMesh-Node-Key" and NODE_KEY_HEADER.lower().encode() == NODE_KEY
