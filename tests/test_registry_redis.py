"""Several gateways share one node registry through a real redis-server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import CLIENT_KEY, NODE_KEY, GatewayProcess, wait_until
from tests.fakes import FakeUpstream, free_port

Up = Callable[..., FakeUpstream]
Gw = Callable[..., GatewayProcess]
NODE = {"X-RoleMesh-Node-Key": NODE_KEY}


class RedisServer:
    """A real redis-server on a fixed loopback port, which a test may stop and start again."""

    def __init__(self, tmp: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("needs redis-server (apt-get install redis-server; .ci/run installs it)")
        self.binary = binary
        self.port = free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        argv = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        self.proc = subprocess.Popen(
            [*argv, "--dir", str(self.tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

        def up() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), 1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")

        wait_until(up, 10, "redis-server")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis: RedisServer) -> str:
    return redis.url


def shared_config(redis_url: str, **nodes: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "default_model": "writer",
        "auth": {"client_api_keys": [CLIENT_KEY], "node_api_keys": [NODE_KEY]},
        "registry": {"backend": "redis", "redis_url": redis_url, "sync_interval_s": 0.2},
        "nodes": {"max_nodes": 2, **nodes},
        "models": {"writer": {"type": "discovered", "role": "writer"}},
    }


def register(gw: GatewayProcess, node_id: str, url: str) -> httpx.Response:
    return httpx.post(
        f"{gw.url}/v1/nodes/register",
        headers=NODE,
        json={"node_id": node_id, "base_url": url, "roles": ["writer"]},
    )


def test_two_gateways_share_nodes(redis_url: str, upstreams: Up, gateway: Gw) -> None:
    a_node = upstreams("a")
    gw_a = gateway(shared_config(redis_url), env={"ROLE_MESH_NODE_STALE_AFTER_S": "2"})
    gw_b = gateway(shared_config(redis_url), env={"ROLE_MESH_NODE_STALE_AFTER_S": "2"})
    assert register(gw_a, "a", a_node.url).status_code == 201
    # B learns of it at once on a heartbeat, and within a sync interval for routing.
    assert (
        httpx.post(f"{gw_b.url}/v1/nodes/heartbeat", headers=NODE, json={"node_id": "a"}).status_code == 200
    )
    with gw_b.client() as b:
        wait_until(
            lambda: b.post("/v1/chat/completions", json={"model": "writer"}).status_code == 200,
            2,
            "gateway B to route to the node registered on A",
        )
        # Heartbeats through B keep the node fresh on A too.
        with gw_a.client() as a:
            for _ in range(4):
                httpx.post(f"{gw_b.url}/v1/nodes/heartbeat", headers=NODE, json={"node_id": "a"})
                wait_until(lambda: a.get("/v1/nodes").json()["data"][0]["status"] == "fresh", 1, "fresh on A")
                time.sleep(0.6)
            # The bound holds across gateways: A has one node, B adds one, the third is refused.
            assert register(gw_b, "b", upstreams("b").url).status_code == 201
            r = register(gw_a, "c", upstreams("c").url)
            assert r.status_code == 507 and r.json()["error"]["code"] == "registry_full"
            # Deregistered on A: gone from B within a sync.
            assert httpx.delete(f"{gw_a.url}/v1/nodes/a", headers=NODE).status_code == 200
            wait_until(
                lambda: [n["node_id"] for n in b.get("/v1/nodes").json()["data"]] == ["b"],
                2,
                "deregistration to reach B",
            )
            assert (
                httpx.post(f"{gw_b.url}/v1/nodes/heartbeat", headers=NODE, json={"node_id": "a"}).status_code
                == 404
            )


def test_shared_registry_survives_gateway_restart(redis_url: str, upstreams: Up, gateway: Gw) -> None:
    node = upstreams("n")
    gw = gateway(shared_config(redis_url))
    assert register(gw, "n", node.url).status_code == 201
    gw.stop()
    gw.start()
    with gw.client() as c:
        # No re-registration needed: the node was kept in Redis.
        assert (
            c.post("/v1/chat/completions", json={"model": "writer"}).json()["choices"][0]["message"][
                "content"
            ]
            == "hello from n"
        )


def test_bad_redis_url_is_a_config_error() -> None:
    from rolemesh_gateway.common.errors import ConfigError
    from rolemesh_gateway.gateway.settings import parse_settings

    cfg = shared_config("http://nope")
    with pytest.raises(ConfigError, match="registry: backend 'redis' needs redis_url"):
        parse_settings(cfg, env={})


def heartbeat(gw: GatewayProcess, node_id: str) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/nodes/heartbeat", headers=NODE, json={"node_id": node_id}, timeout=10)


def test_redis_outage_under_two_gateways(redis: RedisServer, upstreams: Up, gateway: Gw) -> None:
    """Routing goes on from each gateway's view; node writes get a quick 503 saying why; one log
    line when Redis goes and one when it is back; registrations work again then."""
    node = upstreams("n")
    config = shared_config(redis.url)
    gw1, gw2 = gateway(config, process=True), gateway(config, process=True)
    assert register(gw1, "n", node.url).status_code == 201
    wait_until(lambda: heartbeat(gw2, "n").status_code == 200, 5, "gateway 2 to see the node")

    redis.stop()
    for gw in (gw1, gw2):  # clients are still served from the local view
        with gw.client() as c:
            assert [c.post("/v1/chat/completions", json={}).status_code for _ in range(5)] == [200] * 5
    for gw in (gw1, gw2):
        started = time.monotonic()
        r = heartbeat(gw, "n")
        took = time.monotonic() - started
        assert r.status_code == 503 and r.json()["error"]["code"] == "registry_unavailable", r.text
        assert r.headers["retry-after"] and took < 1.0
    time.sleep(1.5)  # several sync rounds while Redis is away
    for gw in (gw1, gw2):
        log = gw.log_text()
        assert log.count("is unreachable") == 1, log[-3000:]
        assert "Traceback" not in log

    redis.start()  # back, and empty (no persistence): the node registers again
    wait_until(
        lambda: register(gw2, "n", node.url).status_code in (200, 201), 5, "registration to work again"
    )
    wait_until(
        lambda: all(gw.log_text().count("reachable again") == 1 for gw in (gw1, gw2)), 5, "recovery logged"
    )
    assert heartbeat(gw1, "n").status_code == 200
    with gw1.client() as c:
        assert c.post("/v1/chat/completions", json={}).status_code == 200


def test_a_node_belongs_to_its_key_across_gateways(redis_url: str, upstreams: Up, gateway: Gw) -> None:
    """Audit findings 6 and 7: with keys in another order on each gateway, a node keeps its own
    key, and another key cannot take it over through either gateway."""
    node = upstreams("n")
    keys = ["nk-node1", "nk-node2"]
    base = shared_config(redis_url)
    gw1 = gateway({**base, "auth": {"client_api_keys": [CLIENT_KEY], "node_api_keys": keys}})
    gw2 = gateway(
        {**base, "auth": {"client_api_keys": [CLIENT_KEY], "node_api_keys": [*keys[::-1], "nk-new"]}}
    )
    body = {"node_id": "n", "base_url": node.url, "roles": ["writer"]}
    r = httpx.post(f"{gw1.url}/v1/nodes/register", json=body, headers={"X-RoleMesh-Node-Key": "nk-node2"})
    assert r.status_code == 201
    for gw in (gw1, gw2):
        stolen = {**body, "base_url": "http://127.0.0.1:9"}
        r = httpx.post(
            f"{gw.url}/v1/nodes/register", json=stolen, headers={"X-RoleMesh-Node-Key": "nk-node1"}
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "node_owned_by_another_key"
        r = httpx.delete(f"{gw.url}/v1/nodes/n", headers={"X-RoleMesh-Node-Key": "nk-node1"})
        assert r.status_code == 403

    def served_by_gw2() -> bool:
        with gw2.client() as c:
            return c.post("/v1/chat/completions", json={}).status_code == 200

    wait_until(served_by_gw2, 5, "gateway 2 to see the node")
    node.seen.clear()
    for gw in (gw1, gw2):
        with gw.client() as c:
            assert c.post("/v1/chat/completions", json={}).status_code == 200
    assert {s.headers.get("x-rolemesh-node-key") for s in node.seen} == {"nk-node2"}  # its own key, always


def test_cold_roles_reach_every_gateway(redis_url: str, upstreams: Up, gateway: Gw) -> None:
    node = upstreams("n")
    gw_a = gateway(shared_config(redis_url))
    gw_b = gateway(shared_config(redis_url))
    body = {"node_id": "n", "base_url": node.url, "roles": ["writer"], "cold_roles": ["writer"]}
    assert httpx.post(f"{gw_a.url}/v1/nodes/register", headers=NODE, json=body).status_code == 201

    def seen_on_b() -> list[str]:
        with gw_b.client() as b:
            nodes = b.get("/v1/nodes").json()["data"]
        return list(nodes[0]["cold_roles"]) if nodes else ["(none)"]

    wait_until(lambda: seen_on_b() == ["writer"], 2, "the cold role seen on B")
    with gw_b.client() as b:
        assert b.get("/v1/models").json()["data"][0]["cold"] is True
    warm = {"node_id": "n", "cold_roles": []}
    assert httpx.post(f"{gw_a.url}/v1/nodes/heartbeat", headers=NODE, json=warm).status_code == 200
    wait_until(lambda: seen_on_b() == [], 2, "warm again on B")
