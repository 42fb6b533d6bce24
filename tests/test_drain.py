"""Node drain: taking a box out of rotation without dropping a single answer (real processes)."""

from __future__ import annotations

import concurrent.futures
import signal
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.agents import AgentProcess
from tests.conftest import CLIENT_KEY, NODE_KEY, GatewayProcess, wait_until
from tests.fakes import FakeUpstream

Gw = Callable[..., GatewayProcess]
Ag = Callable[..., AgentProcess]
Up = Callable[..., FakeUpstream]
ADMIN = "admin-key-for-drain"


def gateway_config() -> dict[str, Any]:
    return {
        "version": 1,
        "default_model": "writer",
        "auth": {"client_api_keys": [CLIENT_KEY], "node_api_keys": [NODE_KEY], "admin_api_keys": [ADMIN]},
        "nodes": {"stale_after_s": 5},
        "models": {"writer": {"type": "discovered", "role": "writer", "max_attempts": 3}},
    }


def agent_config(node_id: str, gateway_url: str, upstream: str) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "gateway_url": gateway_url,
        "node_key": NODE_KEY,
        "heartbeat_interval_s": 0.5,
        "probes": {"interval_s": 0.2, "timeout_s": 1},
        "roles": {"writer": {"proxy_url": upstream}},
    }


def stream(gw: GatewayProcess) -> list[str]:
    with (
        httpx.Client(base_url=gw.url, headers={"X-Api-Key": CLIENT_KEY}, timeout=60) as c,
        c.stream("POST", "/v1/chat/completions", json={"stream": True, "messages": []}) as r,
    ):
        assert r.status_code == 200
        return [line for line in r.iter_lines() if line]


def nodes(gw: GatewayProcess) -> dict[str, dict[str, Any]]:
    r = httpx.get(f"{gw.url}/v1/nodes", headers={"X-Api-Key": ADMIN})
    return {n["node_id"]: n for n in r.json()["data"]}


def test_drain_lets_twenty_streams_finish_and_sends_nothing_new(
    gateway: Gw, agent: Ag, upstreams: Up
) -> None:
    gw = gateway(gateway_config(), process=True)
    up_a = upstreams("a", chunks=20, chunk_interval_s=0.1)  # 2 s streams
    up_b = upstreams("b", chunks=2)
    agent(agent_config("node-a", gw.url, up_a.url))
    wait_until(lambda: "node-a" in nodes(gw), 10, "node a registered")
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        running = [pool.submit(stream, gw) for _ in range(20)]
        wait_until(lambda: nodes(gw)["node-a"]["inflight"] == 20, 10, "20 streams in flight on node a")
        # Another key may not drain it; the operator (admin key) may.
        other = httpx.post(f"{gw.url}/v1/nodes/node-a/drain", headers={"X-Api-Key": CLIENT_KEY})
        assert other.status_code == 401
        r = httpx.post(f"{gw.url}/v1/nodes/node-a/drain", headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 200 and r.json() == {"node_id": "node-a", "draining": True, "inflight": 20}
        assert nodes(gw)["node-a"]["state"] == "draining"
        agent(agent_config("node-b", gw.url, up_b.url))
        wait_until(lambda: "node-b" in nodes(gw), 10, "node b registered")
        seen_a = len(up_a.seen)
        with httpx.Client(base_url=gw.url, headers={"X-Api-Key": CLIENT_KEY}, timeout=30) as c:
            for _ in range(10):
                assert (
                    c.post("/v1/chat/completions", json={"messages": []}).json()["choices"][0]["message"][
                        "content"
                    ]
                    == "hello from b"
                )
        results = [f.result(timeout=60) for f in running]
    assert all(lines[-1] == "data: [DONE]" and len(lines) == 22 for lines in results)  # 20 chunks, stop, end
    assert len(up_a.seen) == seen_a  # no new request reached the drained node
    r = httpx.post(f"{gw.url}/v1/nodes/node-a/undrain", headers={"X-Api-Key": ADMIN})
    assert r.status_code == 200 and nodes(gw)["node-a"]["state"] == "fresh"


def test_a_node_may_drain_itself_but_not_another(gateway: Gw, upstreams: Up) -> None:
    gw = gateway(gateway_config())
    up = upstreams("a")
    keyed = {"X-RoleMesh-Node-Key": NODE_KEY}
    body = {"node_id": "a", "base_url": up.url, "roles": ["writer"]}
    assert httpx.post(f"{gw.url}/v1/nodes/register", json=body, headers=keyed).status_code == 201
    assert httpx.post(f"{gw.url}/v1/nodes/a/drain", headers=keyed).status_code == 200
    assert httpx.post(f"{gw.url}/v1/nodes/ghost/drain", headers=keyed).status_code == 404
    assert httpx.post(f"{gw.url}/v1/nodes/a/reboot", headers=keyed).status_code == 404
    with gw.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": []})
        assert r.status_code == 503 and "draining" in r.json()["error"]["message"]
        assert c.get("/v1/models").json()["rolemesh"]["aliases"]["writer"]["draining_nodes"] == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_sigterm_on_an_agent_drains_it_and_its_streams_complete(
    gateway: Gw, agent: Ag, upstreams: Up, sig: signal.Signals
) -> None:
    gw = gateway(gateway_config(), process=True)
    up = upstreams("a", chunks=30, chunk_interval_s=0.1)  # 3 s streams
    a = agent(agent_config("node-a", gw.url, up.url))
    wait_until(lambda: "node-a" in nodes(gw), 10, "node a registered")
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        running = [pool.submit(stream, gw) for _ in range(5)]
        wait_until(lambda: nodes(gw)["node-a"]["inflight"] == 5, 10, "5 streams in flight")
        a.signal_nowait(sig)
        wait_until(
            lambda: nodes(gw).get("node-a", {}).get("state") in ("draining", None), 5, "the node draining"
        )
        results = [f.result(timeout=60) for f in running]
    assert all(lines[-1] == "data: [DONE]" and len(lines) == 32 for lines in results)
    assert a.proc is not None and a.proc.wait(30) in (0, -signal.SIGTERM)
    wait_until(lambda: "node-a" not in nodes(gw), 5, "the node deregistered")
    assert "draining at" in a.log_text()
