"""Models on demand with the real llama-server: load on the first request, unload when idle,
one load for many concurrent first requests, ``max_running`` without killing a stream.

Gateway in process, the node agent as a subprocess starting the real llama-server with the
tiny model. ``idle_unload_s`` is short so that the whole cycle takes a few seconds.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from tests.agents import AgentProcess
from tests.conftest import CLIENT_KEY, NODE_KEY, GatewayProcess, wait_until

Gw = Callable[..., GatewayProcess]
Ag = Callable[..., AgentProcess]
LLAMA_ARGS = ["-c", "2048", "-n", "16", "-t", "1", "--chat-template", "chatml"]
HELLO = [{"role": "user", "content": "Say hello in 3 words."}]
IDLE_S = 1.5


def gateway_config() -> dict[str, Any]:
    return {
        "version": 1,
        "default_model": "planner",
        "auth": {"client_api_keys": [CLIENT_KEY], "node_api_keys": [NODE_KEY]},
        "models": {
            "planner": {"type": "discovered", "role": "planner"},
            "writer": {"type": "discovered", "role": "writer"},
        },
    }


def agent_config(
    gateway_url: str, binary: str, model: Path, idle_unload_s: float | None = IDLE_S, **top: Any
) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": str(model), "binary": binary, "args": LLAMA_ARGS, "start": "on_demand"}
    if idle_unload_s is not None:
        spec["idle_unload_s"] = idle_unload_s
    return {
        "node_id": "od-node",
        "gateway_url": gateway_url,
        "node_key": NODE_KEY,
        "heartbeat_interval_s": 0.5,
        "supervisor": {"stop_grace_s": 5, "load_timeout_s": 30},
        "probes": {"interval_s": 1, "timeout_s": 5},
        "roles": {"planner": {"llama_server": spec}, "writer": {"llama_server": spec}},
        **top,
    }


def chat(gw: GatewayProcess, model: str, **extra: Any) -> httpx.Response:
    with gw.client() as c:
        c.timeout = httpx.Timeout(60)
        body = {"model": model, "messages": HELLO, "max_tokens": 4, **extra}
        return c.post("/v1/chat/completions", json=body)


def metric(agent: AgentProcess, name: str, **labels: str) -> float:
    text = httpx.get(f"{agent.url}/metrics", headers={"X-RoleMesh-Node-Key": NODE_KEY}, timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def aliases(gw: GatewayProcess) -> dict[str, Any]:
    with gw.client() as c:
        data: dict[str, Any] = c.get("/v1/models").json()["rolemesh"]["aliases"]
    return data


def registered(gw: GatewayProcess) -> bool:
    return all(a["available"] for a in aliases(gw).values())


def test_a_cold_role_loads_on_the_first_request_unloads_when_idle_and_loads_again(
    gateway: Gw, agent: Ag, llama_server_bin: str, tiny_model: Path
) -> None:
    gw = gateway(gateway_config())
    a = agent(agent_config(gw.url, llama_server_bin, tiny_model))
    wait_until(lambda: registered(gw), 10, "the cold roles registered")
    # Registered and available, but nothing runs: the gateway says the alias is cold.
    assert a.roles() == {"planner": "cold", "writer": "cold"}
    # The agent's own endpoints and its heartbeats (every 0.5 s meanwhile) start nothing.
    with httpx.Client(base_url=a.url, headers={"X-RoleMesh-Node-Key": NODE_KEY}, timeout=5) as c:
        assert c.get("/metrics").status_code == 200
        assert sorted(m["id"] for m in c.get("/v1/models").json()["data"]) == ["planner", "writer"]
    time.sleep(1.0)
    assert a.children() == []
    assert aliases(gw)["planner"]["cold"] is True
    with gw.client() as c:
        listed = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        nodes = c.get("/v1/nodes").json()["data"]
    assert listed["planner"]["cold"] is True
    assert nodes[0]["cold_roles"] == ["planner", "writer"]

    started = time.monotonic()
    r = chat(gw, "planner")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    assert time.monotonic() - started < 30
    assert len(a.children()) == 1 and a.roles()["planner"] == "ready"
    # The time to the first byte, load included, is reported in the log and as a metric.
    assert re.search(r"role planner: first byte after [\d.]+s, of which [\d.]+s waiting", a.log_text())
    assert metric(a, "rolemesh_agent_model_loads_total", role="planner") == 1
    assert metric(a, "rolemesh_agent_cold_start_first_byte_seconds_count", role="planner") == 1
    assert metric(a, "rolemesh_agent_model_load_seconds_sum", role="planner") > 0
    wait_until(lambda: aliases(gw)["planner"]["cold"] is False, 5, "the gateway told planner is warm")

    # Nothing in flight for idle_unload_s: stopped, cold again (the agent's own probes and
    # heartbeat /slots reads meanwhile do not keep it warm).
    wait_until(lambda: a.roles()["planner"] == "cold", IDLE_S + 5, "planner unloaded when idle")
    assert a.children() == []
    assert metric(a, "rolemesh_agent_model_unloads_total", role="planner", reason="idle") == 1
    wait_until(lambda: aliases(gw)["planner"]["cold"] is True, 5, "the gateway told planner is cold")

    r = chat(gw, "planner", stream=True)
    assert r.status_code == 200 and "data: [DONE]" in r.text
    assert metric(a, "rolemesh_agent_model_loads_total", role="planner") == 2


def test_twenty_concurrent_first_requests_cause_one_start(
    gateway: Gw, agent: Ag, llama_server_bin: str, tiny_model: Path
) -> None:
    gw = gateway(gateway_config())
    a = agent(agent_config(gw.url, llama_server_bin, tiny_model, idle_unload_s=None))
    wait_until(lambda: registered(gw), 10, "the cold roles registered")
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: chat(gw, "writer"), range(20)))
    assert [r.status_code for r in answers] == [200] * 20
    assert metric(a, "rolemesh_agent_model_loads_total", role="writer") == 1
    assert a.log_text().count("role writer: starting ") == 1
    assert len(a.children()) == 1


def test_max_running_one_alternates_roles_and_never_stops_a_server_with_a_stream_in_flight(
    gateway: Gw, agent: Ag, llama_server_bin: str, tiny_model: Path
) -> None:
    gw = gateway(gateway_config())
    a = agent(agent_config(gw.url, llama_server_bin, tiny_model, idle_unload_s=None, max_running=1))
    wait_until(lambda: registered(gw), 10, "the cold roles registered")
    for model in ("planner", "writer", "planner", "writer"):
        r = chat(gw, model)
        assert r.status_code == 200, r.text
        assert len(a.children()) == 1  # one at a time: the other was stopped first
    assert metric(a, "rolemesh_agent_model_unloads_total", role="planner", reason="evicted") == 2

    # A long stream on planner; writer asked for meanwhile must wait for it, not kill it.
    assert chat(gw, "planner").status_code == 200
    tokens = 1500
    body = {
        "model": "planner",
        "messages": HELLO,
        "max_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    other: list[httpx.Response] = []
    done_at: list[float] = []
    usage: dict[str, Any] = {}
    with httpx.Client(base_url=gw.url, headers={"X-Api-Key": CLIENT_KEY}, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as stream:
            lines = stream.iter_lines()
            first = next(lines)
            assert first.startswith("data: ")
            asker = threading.Thread(target=lambda: other.append(chat(gw, "writer")))
            asker.start()
            for line in lines:
                time.sleep(0.001)  # a slow reader keeps the stream in flight a little longer
                if line.startswith("data: {") and '"usage"' in line:
                    usage = orjson.loads(line[6:]).get("usage") or usage
                assert '"error"' not in line, line
            done_at.append(time.monotonic())
        asker.join(60)
    assert usage.get("completion_tokens") == tokens  # the whole stream, uncut
    assert other and other[0].status_code == 200, other[0].text if other else "no answer"
    assert metric(a, "rolemesh_agent_model_unloads_total", role="planner", reason="evicted") == 3
