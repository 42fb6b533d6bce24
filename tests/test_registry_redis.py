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


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("needs redis-server (apt-get install redis-server; .ci/run installs it)")
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def up() -> bool:
            out = subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True)
            return out.stdout.strip() == "PONG"

        if shutil.which("redis-cli"):
            wait_until(up, 10, "redis-server")
        else:
            wait_until(lambda: socket.create_connection(("127.0.0.1", port), 1).close() is None, 10, "redis")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


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
