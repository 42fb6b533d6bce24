"""The node API, called as an ASGI app: register, heartbeat, deregister and the node list."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest

from rolemesh_gateway.common.auth import key_id
from rolemesh_gateway.common.protocol import NODE_KEY
from rolemesh_gateway.gateway.app import Gateway, create_app
from rolemesh_gateway.gateway.registry import MemoryRegistry
from rolemesh_gateway.gateway.settings import parse_settings
from tests.conftest import ROOT
from tests.fakeclient import FakeClient, Sent, call_app, receiver, run, scope

CLIENT_KEY = "client-key-1"
NODE_KEY_VALUE = "node-key-1"
AS_NODE = [(NODE_KEY, NODE_KEY_VALUE.encode())]
AS_CLIENT = [(b"x-api-key", CLIENT_KEY.encode())]
NODE = {"node_id": "gpu-1", "base_url": "http://10.0.0.1:8091", "roles": ["chat"]}


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class World:
    def __init__(self, max_nodes: int = 100) -> None:
        settings = parse_settings(
            {
                "version": 1,
                "default_model": "chat",
                "auth": {"client_api_keys": [CLIENT_KEY], "node_api_keys": [NODE_KEY_VALUE]},
                "nodes": {"stale_after_s": 30, "max_nodes": max_nodes},
                "models": {"chat": {"type": "discovered", "role": "chat"}},
            },
            env={},
        )
        self.clock = Clock()
        self.registry = MemoryRegistry(
            stale_after_s=30, evict_after_s=3600, max_nodes=max_nodes, clock=self.clock
        )
        self.client = FakeClient()
        self.app: Gateway = create_app(settings, self.registry, self.client)  # type: ignore[arg-type]

    async def register(self, body: Any = None, headers: list[tuple[bytes, bytes]] | None = None) -> Sent:
        return await call_app(
            self.app, "POST", "/v1/nodes/register", NODE if body is None else body, headers or AS_NODE
        )

    async def heartbeat(self, body: Any, headers: list[tuple[bytes, bytes]] | None = None) -> Sent:
        return await call_app(self.app, "POST", "/v1/nodes/heartbeat", body, headers or AS_NODE)

    async def nodes(self) -> list[dict[str, Any]]:
        sent = await call_app(self.app, "GET", "/v1/nodes", headers=AS_CLIENT)
        assert sent.status == 200
        data: list[dict[str, Any]] = sent.json()["data"]
        return data

    def ids(self) -> list[str]:
        return sorted(n.node_id for n in self.registry.all_nodes())


# -- register -----------------------------------------------------------------------------------
def test_register_is_201_then_200_with_the_heartbeat_hint() -> None:
    async def go() -> None:
        w = World()
        first = await w.register()
        assert first.status == 201
        assert first.json() == {"node_id": "gpu-1", "stale_after_s": 30.0, "heartbeat_interval_hint_s": 10.0}
        again = await w.register({**NODE, "base_url": "http://10.0.0.2:8091"})
        assert again.status == 200 and again.json()["node_id"] == "gpu-1"
        (node,) = w.registry.all_nodes()
        assert node.base_url == "http://10.0.0.2:8091"
        assert node.key_id == key_id(NODE_KEY_VALUE)  # the key the gateway will send back to it

    run(go())


def test_register_needs_a_node_key_and_a_client_key_is_not_one() -> None:
    async def go() -> None:
        w = World()
        for headers in ([(b"content-type", b"application/json")], AS_CLIENT, [(NODE_KEY, b"wrong")]):
            sent = await w.register(headers=headers)
            assert sent.status == 401 and sent.json()["error"]["type"] == "authentication_error"
        assert w.ids() == []

    run(go())


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"base_url": "http://10.0.0.1:8091", "roles": ["chat"]}, "node_id"),
        ({**NODE, "roles": []}, "roles"),
        ({**NODE, "roles": "chat"}, "roles"),
        ({**NODE, "roles": ["chat", "bad role"]}, "roles.1"),
        ({**NODE, "base_url": "10.0.0.1:8091"}, "base_url"),
        ({**NODE, "node_id": 17}, "node_id"),
        ({**NODE, "slots_total": "4"}, "slots_total"),
        ({**NODE, "slots_busy": -1}, "slots_busy"),
    ],
)
def test_malformed_registration_is_400_naming_the_field_and_changes_nothing(
    body: dict[str, Any], field: str
) -> None:
    async def go() -> None:
        w = World()
        sent = await w.register(body)
        assert sent.status == 400
        error = sent.json()["error"]
        assert error["code"] == "invalid_node_message"
        assert error["message"].startswith(f"invalid node registration: {field}: ")
        assert error["param"] == field.split(".")[0]
        assert w.ids() == []

    run(go())


@pytest.mark.parametrize(
    ("raw", "code"), [(b"{oops", "invalid_json"), (b'["gpu-1"]', "bad_request"), (b"", "invalid_json")]
)
def test_registration_that_is_not_a_json_object_is_400(raw: bytes, code: str) -> None:
    async def go() -> None:
        w = World()
        sent = await w.register(raw)
        assert sent.status == 400 and sent.json()["error"]["code"] == code
        assert w.ids() == []

    run(go())


def test_an_oversized_registration_is_refused_unread() -> None:
    async def go() -> None:
        w = World()
        sent = await w.register({**NODE, "version": "x" * 70_000})
        assert sent.status == 413 and w.ids() == []

    run(go())


def test_a_full_registry_is_507_for_new_nodes_only() -> None:
    async def go() -> None:
        w = World(max_nodes=1)
        assert (await w.register()).status == 201
        sent = await w.register({**NODE, "node_id": "gpu-2"})
        assert sent.status == 507 and sent.json()["error"]["code"] == "registry_full"
        assert (await w.register()).status == 200
        assert w.ids() == ["gpu-1"]

    run(go())


# -- heartbeat ----------------------------------------------------------------------------------
def test_heartbeat_of_a_known_node_refreshes_it_and_stores_load() -> None:
    async def go() -> None:
        w = World()
        await w.register()
        w.clock.now += 40
        assert (await w.nodes())[0]["state"] == "stale"
        sent = await w.heartbeat({"node_id": "gpu-1", "slots_total": 4, "slots_busy": 3, "inflight": 2})
        assert sent.status == 200 and sent.json() == {"node_id": "gpu-1", "status": "ok"}
        (listed,) = await w.nodes()
        assert (listed["state"], listed["slots_total"], listed["slots_busy"]) == ("fresh", 4, 3)

    run(go())


def test_heartbeat_of_an_unknown_node_is_404_node_not_found() -> None:
    async def go() -> None:
        w = World()
        sent = await w.heartbeat({"node_id": "ghost"})
        assert sent.status == 404
        error = sent.json()["error"]
        assert error["code"] == "node_not_found"
        assert error["message"] == "node 'ghost' is not registered; register it again"
        assert w.ids() == []  # a heartbeat never registers

    run(go())


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "node_id"),
        ({"node_id": "has space"}, "node_id"),
        ({"node_id": "gpu-1", "inflight": -2}, "inflight"),
    ],
)
def test_malformed_heartbeat_is_400_naming_the_field_and_changes_nothing(
    body: dict[str, Any], field: str
) -> None:
    async def go() -> None:
        w = World()
        await w.register()
        w.clock.now += 40
        sent = await w.heartbeat(body)
        assert sent.status == 400
        assert sent.json()["error"]["message"].startswith(f"invalid node heartbeat: {field}: ")
        assert (await w.nodes())[0]["state"] == "stale"  # not refreshed by a refused heartbeat

    run(go())


def test_heartbeat_needs_the_node_key() -> None:
    async def go() -> None:
        w = World()
        await w.register()
        w.clock.now += 40
        assert (await w.heartbeat({"node_id": "gpu-1"}, AS_CLIENT)).status == 401
        assert (await w.nodes())[0]["state"] == "stale"

    run(go())


# -- deregister ---------------------------------------------------------------------------------
def test_deregister_then_it_is_gone() -> None:
    async def go() -> None:
        w = World()
        await w.register()
        sent = await call_app(w.app, "DELETE", "/v1/nodes/gpu-1", headers=AS_NODE)
        assert sent.status == 200 and sent.json() == {"node_id": "gpu-1", "status": "deregistered"}
        assert w.ids() == [] and await w.nodes() == []
        again = await call_app(w.app, "DELETE", "/v1/nodes/gpu-1", headers=AS_NODE)
        assert again.status == 404 and again.json()["error"]["code"] == "node_not_found"

    run(go())


def test_deregister_needs_the_node_key_and_an_exact_id() -> None:
    async def go() -> None:
        w = World()
        await w.register()
        assert (await call_app(w.app, "DELETE", "/v1/nodes/gpu-1", headers=AS_CLIENT)).status == 401
        assert (await call_app(w.app, "DELETE", "/v1/nodes/gpu-1/x", headers=AS_NODE)).status == 404
        assert (await call_app(w.app, "DELETE", "/v1/nodes/", headers=AS_NODE)).status == 404
        assert w.ids() == ["gpu-1"]

    run(go())


# -- the node list ------------------------------------------------------------------------------
def test_node_list_shows_each_state_by_the_routing_rule() -> None:
    async def go() -> None:
        w = World()
        for node_id in ("c-stale", "a-fresh", "b-ejected"):
            await w.register({**NODE, "node_id": node_id, "version": "0.1.0"})
        w.clock.now += 31
        for node_id in ("a-fresh", "b-ejected"):
            assert (await w.heartbeat({"node_id": node_id})).status == 200
        ejected = next(n for n in w.registry.all_nodes() if n.node_id == "b-ejected")
        ejected.ejected_until = w.clock.now + 5
        listed = await w.nodes()
        assert [n["node_id"] for n in listed] == ["a-fresh", "b-ejected", "c-stale"]
        assert [n["state"] for n in listed] == ["fresh", "ejected", "stale"]
        assert [n["ejected"] for n in listed] == [False, True, False]
        assert [n["status"] for n in listed] == ["fresh", "fresh", "stale"]
        assert [n["seconds_since_heartbeat"] for n in listed] == [0.0, 0.0, 31.0]
        assert listed[0]["roles"] == ["chat"] and listed[0]["version"] == "0.1.0"
        assert listed[0]["base_url"] == NODE["base_url"] and listed[0]["inflight"] == 0

    run(go())


def test_node_list_is_for_clients_not_nodes() -> None:
    async def go() -> None:
        w = World()
        assert (await call_app(w.app, "GET", "/v1/nodes", headers=AS_NODE)).status == 401
        sent = await call_app(w.app, "GET", "/v1/nodes", headers=AS_CLIENT)
        assert sent.json() == {"object": "list", "data": [], "stale_after_s": 30.0}

    run(go())


# -- node identity from the client certificate (nodes.identity) -----------------------------------
@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    subprocess.run([str(ROOT / "scripts" / "make_certs.sh"), "-o", str(d)], check=True, capture_output=True)
    return d


def identity_app(ca: Path, identity: str, https_only: bool = False) -> Gateway:
    settings = parse_settings(
        {
            "version": 1,
            "default_model": "chat",
            "auth": {"client_api_keys": [CLIENT_KEY], "node_api_keys": [NODE_KEY_VALUE]},
            "nodes": {"identity": identity, "verify_server_names": https_only},
            "tls": {
                "cert_file": str(ca / "gateway.crt"),
                "key_file": str(ca / "gateway.key"),
                "client_ca_file": str(ca / "ca.crt"),
            },
            "models": {"chat": {"type": "discovered", "role": "chat"}},
        },
        env={},
    )
    return create_app(
        settings, MemoryRegistry(stale_after_s=30, evict_after_s=3600, max_nodes=100), FakeClient()
    )  # type: ignore[arg-type]


async def as_cert(
    app: Gateway, method: str, path: str, names: tuple[str, ...] | None, body: Any = b"", key: bool = False
) -> Sent:
    """A request as it comes over mutual TLS: the names of the client's certificate in the scope."""
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    headers = [*(AS_NODE if key else []), (b"content-length", b"%d" % len(raw))]
    s = scope(method, path, headers)
    s["client"] = ("10.0.0.1", 40000)
    if names is not None:
        s["extensions"] = {"tls": {"client_cert_names": names}}
    sent = Sent()
    await app(s, receiver(raw), sent)
    return sent


def test_certificate_identity_lets_a_node_act_only_as_the_name_it_carries(
    ca: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def go() -> None:
        app = identity_app(ca, "certificate")
        # No key needed, but a certificate that names the node.
        assert (await as_cert(app, "POST", "/v1/nodes/register", ("gpu-1",), NODE)).status == 201
        hb = {"node_id": "gpu-1"}
        assert (await as_cert(app, "POST", "/v1/nodes/heartbeat", ("gpu-1",), hb)).status == 200
        other = await as_cert(app, "POST", "/v1/nodes/register", ("gpu-2", "gpu2.lan"), NODE)
        assert other.status == 403
        assert other.json()["error"]["message"].startswith(
            "the client certificate names gpu-2, gpu2.lan, not node 'gpu-1' (nodes.identity: certificate)"
        )
        assert (await as_cert(app, "POST", "/v1/nodes/heartbeat", ("gpu-2",), hb)).status == 403
        assert (await as_cert(app, "POST", "/v1/nodes/gpu-1/drain", ("gpu-2",))).status == 403
        assert (await as_cert(app, "DELETE", "/v1/nodes/gpu-1", ("gpu-2",))).status == 403
        none = await as_cert(app, "POST", "/v1/nodes/register", None, NODE, key=True)
        assert none.status == 401 and "none was presented" in none.json()["error"]["message"]
        assert (await as_cert(app, "POST", "/v1/nodes/gpu-1/drain", ("gpu-1",))).status == 200
        assert (await as_cert(app, "DELETE", "/v1/nodes/gpu-1", ("gpu-1",))).status == 200

    with caplog.at_level("WARNING", logger="rolemesh.nodes"):
        run(go())
    assert (
        "registration of node 'gpu-1' from 10.0.0.1:40000 refused: the client certificate names gpu-2"
        in caplog.text
    )


def test_both_needs_the_key_and_the_certificate(ca: Path) -> None:
    async def go() -> None:
        app = identity_app(ca, "both")
        assert (await as_cert(app, "POST", "/v1/nodes/register", ("gpu-1",), NODE)).status == 401  # no key
        assert (await as_cert(app, "POST", "/v1/nodes/register", None, NODE, key=True)).status == 401
        assert (await as_cert(app, "POST", "/v1/nodes/register", ("gpu-1",), NODE, key=True)).status == 201

    run(go())


def test_verify_server_names_wants_https_nodes(ca: Path) -> None:
    async def go() -> None:
        app = identity_app(ca, "key", https_only=True)
        sent = await as_cert(app, "POST", "/v1/nodes/register", None, NODE, key=True)
        assert sent.status == 400
        assert (
            "is not https: this gateway checks each node's server certificate"
            in sent.json()["error"]["message"]
        )
        https = {**NODE, "base_url": "https://10.0.0.1:8091"}
        assert (await as_cert(app, "POST", "/v1/nodes/register", None, https, key=True)).status == 201

    run(go())
