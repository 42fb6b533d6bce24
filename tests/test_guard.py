"""Who may call what: open mode, node-keys-only mode, and client and node keys kept apart."""

from __future__ import annotations

import pytest

from rolemesh_gateway.common.auth import key_id
from rolemesh_gateway.common.errors import Unauthorized
from rolemesh_gateway.common.protocol import NODE_KEY
from rolemesh_gateway.gateway.guard import Guard
from rolemesh_gateway.gateway.settings import AuthSettings

CLIENT = "client-key-123"
NODE = "node-key-456"


def as_client(key: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", b"Bearer " + key.encode())]


def as_node(key: str) -> list[tuple[bytes, bytes]]:
    return [(NODE_KEY, key.encode())]


def test_open_mode_lets_anyone_call_anything() -> None:
    guard = Guard(AuthSettings())
    assert guard.open
    assert guard.client([]) is None and guard.node([]) is None
    assert guard.client(as_client("whatever")) is None and guard.node(as_node("whatever")) is None


def test_node_keys_only_refuses_clients_and_accepts_nodes() -> None:
    guard = Guard(AuthSettings(node_api_keys=(NODE,)))
    assert not guard.open
    assert guard.node(as_node(NODE)) == key_id(NODE)
    with pytest.raises(Unauthorized, match="missing API key"):
        guard.client([])
    with pytest.raises(Unauthorized, match="invalid API key"):
        guard.client(as_client(NODE))


def test_client_keys_only_disables_node_registration() -> None:
    guard = Guard(AuthSettings(client_api_keys=(CLIENT,)))
    assert guard.client(as_client(CLIENT)) == key_id(CLIENT)
    with pytest.raises(Unauthorized, match=r"node registration is disabled: configure auth\.node_api_keys"):
        guard.node(as_node(CLIENT))


def test_a_client_key_is_no_node_key_and_a_node_key_no_client_key() -> None:
    guard = Guard(AuthSettings(client_api_keys=(CLIENT,), node_api_keys=(NODE,)))
    assert guard.client([(b"x-api-key", CLIENT.encode())]) == key_id(CLIENT)
    assert guard.node(as_node(NODE)) == key_id(NODE)
    with pytest.raises(Unauthorized, match=r"missing or invalid node key \(X-RoleMesh-Node-Key\)"):
        guard.node(as_node(CLIENT))
    with pytest.raises(Unauthorized, match="invalid API key"):
        guard.client([(b"x-api-key", NODE.encode())])
    with pytest.raises(Unauthorized, match="invalid API key"):
        guard.client(as_client(NODE))


def test_node_key_is_read_from_its_header_not_from_client_headers() -> None:
    guard = Guard(AuthSettings(client_api_keys=(CLIENT,), node_api_keys=(NODE,)))
    with pytest.raises(Unauthorized, match="node key"):
        guard.node(as_client(NODE))  # a bearer token is not how a node authenticates here
    with pytest.raises(Unauthorized, match="missing API key"):
        guard.client(as_node(CLIENT))  # nor is the node header a client key


def test_the_same_key_cannot_be_both_kinds() -> None:
    with pytest.raises(ValueError, match="both a node key and a client or admin key"):
        AuthSettings(client_api_keys=("shared",), node_api_keys=("shared",))
