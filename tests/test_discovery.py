"""Pattern B: nodes register and heartbeat; discovered aliases route to fresh nodes only."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import CLIENT_KEY, NODE_KEY, GatewayProcess, wait_until
from tests.fakes import FakeUpstream

Up = Callable[..., FakeUpstream]
Gw = Callable[..., GatewayProcess]
NODE_HEADERS = {"X-RoleMesh-Node-Key": NODE_KEY}


def discovered_config(strategy: str = "round_robin", **extra: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "default_model": "writer",
        "auth": {"client_api_keys": [CLIENT_KEY], "node_api_keys": [NODE_KEY]},
        "models": {"writer": {"type": "discovered", "role": "writer", "strategy": strategy}},
        **extra,
    }


def register(gw: GatewayProcess, node_id: str, url: str, roles: list[str] | None = None) -> httpx.Response:
    return httpx.post(
        f"{gw.url}/v1/nodes/register",
        headers=NODE_HEADERS,
        json={"node_id": node_id, "base_url": url, "roles": roles or ["writer"]},
    )


def heartbeat(gw: GatewayProcess, node_id: str) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/nodes/heartbeat", headers=NODE_HEADERS, json={"node_id": node_id})


def chat(c: httpx.Client, model: str = "writer") -> httpx.Response:
    return c.post("/v1/chat/completions", json={"model": model, "messages": []})


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl binary (apt-get install curl)")
def test_guide_registration_call_verbatim_then_routing(upstreams: Up, gateway: Gw) -> None:
    node = upstreams("gpu-box-1")
    cfg = discovered_config()
    cfg["auth"]["node_api_keys"] = ["<node-key>"]
    gw = gateway(cfg, process=True)  # the guide's uvicorn command, as a process
    # The guide's call with GATEWAY:8000 -> our host:port and the node's URL -> the fake node.
    cmd = f"""curl -sS -X POST http://127.0.0.1:{gw.port}/v1/nodes/register \\
-H 'Content-Type: application/json' \\
-H 'X-RoleMesh-Node-Key: <node-key>' \\
-d '{{"node_id":"gpu-box-1","base_url":"{node.url}","roles":["writer"]}}'"""
    out = subprocess.run(cmd, shell=True, capture_output=True, text=True, check=True)
    assert '"node_id":"gpu-box-1"' in out.stdout
    with gw.client() as c:
        r = chat(c)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hello from gpu-box-1"
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["writer"]
    # The node is told which role is wanted, and gets the key it registered with.
    assert node.seen[-1].body["model"] == "writer"
    assert node.seen[-1].headers["X-RoleMesh-Node-Key"] == "<node-key>"
    assert "X-Api-Key" not in node.seen[-1].headers


def test_round_robin_alternates_exactly_and_random_uses_both(upstreams: Up, gateway: Gw) -> None:
    a, b = upstreams("a"), upstreams("b")
    gw = gateway(discovered_config())
    assert register(gw, "a", a.url).status_code == 201
    assert register(gw, "b", b.url).status_code == 201
    with gw.client() as c:
        answers = [chat(c).json()["choices"][0]["message"]["content"] for _ in range(20)]
    first = answers[0]
    other = "hello from b" if first == "hello from a" else "hello from a"
    assert answers == [first, other] * 10

    c_, d = upstreams("c"), upstreams("d")
    gw2 = gateway(discovered_config("random"))
    register(gw2, "c", c_.url)
    register(gw2, "d", d.url)
    with gw2.client() as c:
        for _ in range(40):
            assert chat(c).status_code == 200
    assert len(c_.seen) > 0 and len(d.seen) > 0 and len(c_.seen) + len(d.seen) == 40


def test_stale_node_gets_no_traffic_and_comes_back(upstreams: Up, gateway: Gw) -> None:
    live, dying = upstreams("live"), upstreams("dying")
    cfg = discovered_config()
    cfg["models"]["planner"] = {"type": "discovered", "role": "planner"}
    gw = gateway(cfg, env={"ROLE_MESH_NODE_STALE_AFTER_S": "2"})
    register(gw, "live", live.url)
    register(gw, "dying", dying.url, roles=["writer", "planner"])
    started = time.monotonic()
    with gw.client() as c:
        # Keep "live" fresh; "dying" never heartbeats again.
        while time.monotonic() - started < 2.3:
            heartbeat(gw, "live")
            assert chat(c).status_code == 200
            time.sleep(0.1)
        before = len(dying.seen)
        for _ in range(10):
            assert chat(c).json()["choices"][0]["message"]["content"] == "hello from live"
        assert len(dying.seen) == before
        nodes = {n["node_id"]: n for n in c.get("/v1/nodes").json()["data"]}
        assert nodes["dying"]["status"] == "stale" and nodes["dying"]["seconds_since_heartbeat"] >= 2
        assert nodes["live"]["status"] == "fresh"
        models = c.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["writer"]
        assert models["rolemesh"]["unavailable_models"] == ["planner"]
        assert models["rolemesh"]["aliases"]["writer"]["fresh_nodes"] == 1
        assert models["rolemesh"]["aliases"]["writer"]["stale_nodes"] == 1
        r = chat(c, "planner")
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_upstream_available"
        assert heartbeat(gw, "dying").status_code == 200
        assert chat(c, "planner").json()["choices"][0]["message"]["content"] == "hello from dying"
        assert sorted(m["id"] for m in c.get("/v1/models").json()["data"]) == ["planner", "writer"]


def test_ready_follows_discovered_default_model(upstreams: Up, gateway: Gw) -> None:
    node = upstreams("n")
    gw = gateway(discovered_config(), env={"ROLE_MESH_NODE_STALE_AFTER_S": "1"})
    r = httpx.get(f"{gw.url}/ready")
    assert r.status_code == 503 and "writer" in r.json()["reason"]
    register(gw, "n", node.url)
    assert httpx.get(f"{gw.url}/ready").status_code == 200
    wait_until(lambda: httpx.get(f"{gw.url}/ready").status_code == 503, 3, "/ready to turn 503")


def test_unknown_heartbeat_deregister_and_key_separation(upstreams: Up, gateway: Gw) -> None:
    node = upstreams("n")
    gw = gateway(discovered_config())
    assert heartbeat(gw, "ghost").status_code == 404
    assert heartbeat(gw, "ghost").json()["error"]["type"] == "invalid_request_error"
    # A client key cannot register; a node key cannot call inference or list models.
    r = httpx.post(
        f"{gw.url}/v1/nodes/register",
        headers={"X-RoleMesh-Node-Key": CLIENT_KEY},
        json={"node_id": "n", "base_url": node.url, "roles": ["writer"]},
    )
    assert r.status_code == 401
    r = httpx.post(
        f"{gw.url}/v1/nodes/register",
        headers={"X-Api-Key": CLIENT_KEY},
        json={"node_id": "n", "base_url": node.url, "roles": ["writer"]},
    )
    assert r.status_code == 401
    assert register(gw, "n", node.url).status_code == 201
    assert register(gw, "n", node.url).status_code == 200  # idempotent
    with httpx.Client(base_url=gw.url, headers={"X-Api-Key": NODE_KEY}) as as_node:
        assert chat(as_node).status_code == 401
        assert as_node.get("/v1/models").status_code == 401
    with gw.client() as c:
        assert len(c.get("/v1/nodes").json()["data"]) == 1
        assert httpx.delete(f"{gw.url}/v1/nodes/n", headers=NODE_HEADERS).status_code == 200
        assert httpx.delete(f"{gw.url}/v1/nodes/n", headers=NODE_HEADERS).status_code == 404
        assert c.get("/v1/nodes").json()["data"] == []
        assert chat(c).status_code == 503


@pytest.mark.parametrize(
    "body",
    [
        b'{"node_id":"x","base_url":"http://127.0.0.1:1"}',
        b'{"node_id":"x","base_url":"http://127.0.0.1:1","roles":[]}',
        b'{"node_id":"x","base_url":"file:///etc/passwd","roles":["writer"]}',
        b'{"node_id":"","base_url":"http://127.0.0.1:1","roles":["writer"]}',
        b'{"node_id":"' + b"x" * 10240 + b'","base_url":"http://127.0.0.1:1","roles":["writer"]}',
        b'{"node_id":"x","base_url":"http://127.0.0.1:1","roles":"writer"}',
        b'{"node_id":"x","base_url":"http://127.0.0.1:1","roles":[""]}',
        b'{"node_id":"x y","base_url":"http://127.0.0.1:1","roles":["writer"]}',
        b'{"node_id":"x","base_url":"http://","roles":["writer"]}',
        b'{"node_id":"x",',
        b"[]",
    ],
)
def test_malformed_registrations_are_refused_and_change_nothing(gateway: Gw, body: bytes) -> None:
    gw = gateway(discovered_config())
    r = httpx.post(f"{gw.url}/v1/nodes/register", headers=NODE_HEADERS, content=body)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["message"]
    with gw.client() as c:
        assert c.get("/v1/nodes").json()["data"] == []
