"""Where nodes may point (audit findings 8, 10, 13): allowed networks, the gateway itself, loops."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from rolemesh_gateway.common.errors import BadRequest
from rolemesh_gateway.gateway.node_policy import NodePolicy
from tests.conftest import CLIENT_KEY, NODE_KEY, GatewayProcess
from tests.fakeclient import run
from tests.fakes import FakeUpstream

Gw = Callable[..., GatewayProcess]


@pytest.mark.parametrize(
    ("address", "default", "lan_only"),
    [
        ("127.0.0.1", True, False),
        ("10.0.0.12", True, True),
        ("169.254.169.254", False, False),  # cloud metadata: link-local
        ("fe80::1", False, False),
        ("0.0.0.0", False, False),
        ("::", False, False),
        ("224.0.0.1", False, False),
        ("::ffff:169.254.169.254", False, False),  # the same, written as IPv6
        ("not-an-ip", False, False),
    ],
)
def test_allows(address: str, default: bool, lan_only: bool) -> None:
    assert NodePolicy(None).allows(address) is default
    assert NodePolicy(("10.0.0.0/8",)).allows(address) is lan_only


def test_registration_checks_what_the_name_resolves_to_and_the_gateway_itself() -> None:
    async def go() -> None:
        policy = NodePolicy(("10.0.0.0/8",))
        with pytest.raises(BadRequest, match=r"localhost is 127\.0\.0\.1.*nodes\.allowed_networks"):
            await policy.check_registration("http://localhost:8091", None)
        with pytest.raises(BadRequest, match="does not resolve"):
            await policy.check_registration("http://no-such-host.invalid:8091", None)
        await policy.check_registration("http://10.1.2.3:8091", None)
        own = NodePolicy(None)
        with pytest.raises(BadRequest, match="this gateway's own address"):
            await own.check_registration("http://127.0.0.1:8000", ("127.0.0.1", 8000))
        await own.check_registration("http://127.0.0.1:8091", ("127.0.0.1", 8000))  # another port: fine

    run(go())


def discovered(**nodes: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "default_model": "writer",
        "auth": {"client_api_keys": [CLIENT_KEY], "node_api_keys": [NODE_KEY]},
        "nodes": nodes,
        "models": {"writer": {"type": "discovered", "role": "writer"}},
    }


def register(gw: GatewayProcess, url: str, node_id: str = "n1") -> httpx.Response:
    body = {"node_id": node_id, "base_url": url, "roles": ["writer"]}
    return httpx.post(f"{gw.url}/v1/nodes/register", json=body, headers={"X-RoleMesh-Node-Key": NODE_KEY})


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254",
        "http://127.0.0.1:9/x\n2030-01-01 WARNING forged log line",
        "http://127.0.0.1:9/\tx",
        "http://user:pw@127.0.0.1:9",
        "http://127.0.0.1:9/caf\u00e9",
    ],
)
def test_bad_base_urls_are_refused_and_change_nothing(gateway: Gw, url: str) -> None:
    gw = gateway(discovered())
    r = register(gw, url)
    assert r.status_code == 400 and r.json()["error"]["param"] == "base_url", r.text
    with gw.client() as c:
        assert c.get("/v1/nodes").json()["data"] == []


def test_allowed_networks_hold_at_connect_time_too(
    gateway: Gw, upstreams: Callable[..., FakeUpstream]
) -> None:
    node = upstreams("n1")
    gw = gateway(discovered(allowed_networks=["127.0.0.1/32"]))
    assert register(gw, node.url.replace("127.0.0.1", "localhost")).status_code == 201
    with gw.client() as c:
        assert c.post("/v1/chat/completions", json={"messages": []}).status_code == 200
    # The same node URL, but the gateway may now use only another network: refused on connect.
    gw2 = gateway(discovered(allowed_networks=["10.0.0.0/8"]))
    assert register(gw2, node.url).status_code == 400


def test_nodes_that_lead_back_to_the_gateway_cannot_make_a_request_loop(gateway: Gw) -> None:
    """Audit finding 13: in open mode a node registered at the gateway's own URL used to recurse
    until file descriptors ran out. Its own address is refused; a loop through another gateway
    is stopped by ``x-rolemesh-via``."""
    config = {
        "version": 1,
        "default_model": "writer",
        "models": {"writer": {"type": "discovered", "role": "writer"}},
    }
    a, b = gateway(config), gateway(config)
    own = {"node_id": "self", "base_url": a.url, "roles": ["writer"]}
    assert httpx.post(f"{a.url}/v1/nodes/register", json=own).status_code == 400
    for gw, other in ((a, b), (b, a)):  # A's node is B, B's node is A
        body = {"node_id": "other", "base_url": other.url, "roles": ["writer"]}
        assert httpx.post(f"{gw.url}/v1/nodes/register", json=body).status_code == 201
    r = httpx.post(f"{a.url}/v1/chat/completions", json={"messages": []}, timeout=30)
    assert r.status_code == 502 and r.json()["error"]["code"] == "loop_detected", r.text
