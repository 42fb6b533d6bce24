"""Gateway -> node agent -> real llama-server, all as subprocesses, with the tiny GGUF model.

Each test builds its own stack (a gateway with ``type: discovered`` aliases, an agent serving
planner and writer from the tiny model) because each one breaks something on purpose.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.agents import AgentProcess, alive
from tests.conftest import CLIENT_KEY, NODE_KEY, ROOT, GatewayProcess, wait_until

Gw = Callable[..., GatewayProcess]
Ag = Callable[..., AgentProcess]
HEARTBEAT_S = 1.0
STALE_S = 4.0
#: Random weights never choose to stop: every request bounds its length.
LLAMA_ARGS = ["-c", "512", "-n", "32", "-t", "1", "--chat-template", "chatml"]
HELLO = [{"role": "user", "content": "Say hello in 3 words."}]


@dataclass
class Stack:
    gateway: GatewayProcess
    agent: AgentProcess

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway.url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=30)

    def llama_pids(self) -> dict[str, int]:
        """Role -> pid of its llama-server, as the agent reports it."""
        with httpx.Client(headers={"X-RoleMesh-Node-Key": NODE_KEY}, timeout=5) as c:
            roles = c.get(f"{self.agent.url}/v1/models").json()["rolemesh"]["roles"]
        return {role: info["pid"] for role, info in roles.items() if info["pid"]}


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


def agent_config(gateway_url: str, binary: str, model: Path) -> dict[str, Any]:
    spec = {"model": str(model), "binary": binary, "args": LLAMA_ARGS}
    return {
        "node_id": "e2e-node",
        "gateway_url": gateway_url,
        "node_key": NODE_KEY,
        "heartbeat_interval_s": HEARTBEAT_S,
        "supervisor": {"backoff_initial_s": 0.5, "stop_grace_s": 5},
        "probes": {"interval_s": 1, "timeout_s": 5},
        "roles": {"planner": {"llama_server": spec}, "writer": {"llama_server": spec}},
    }


def start_gateway(gateway: Gw, port: int | None = None) -> GatewayProcess:
    # The stale timeout comes from the guide's environment variable.
    return gateway(gateway_config(), env={"ROLE_MESH_NODE_STALE_AFTER_S": str(STALE_S)}, port=port)


def serving(gw: GatewayProcess, *models: str) -> bool:
    """True when every model answers a one-token chat through the gateway."""
    with gw.client() as c:
        for model in models:
            r = c.post("/v1/chat/completions", json={"model": model, "messages": HELLO, "max_tokens": 1})
            if r.status_code != 200:
                return False
    return True


@pytest.fixture
def stack(gateway: Gw, agent: Ag, llama_server_bin: str, tiny_model: Path) -> Iterator[Stack]:
    gw = start_gateway(gateway)
    a = agent(agent_config(gw.url, llama_server_bin, tiny_model))
    a.wait_ready(60)
    wait_until(lambda: serving(gw, "planner", "writer"), 10, "both roles served through the gateway")
    yield Stack(gw, a)


def node_status(gw: GatewayProcess) -> str | None:
    with gw.client() as c:
        data = c.get("/v1/nodes").json()["data"]
    return next((n["status"] for n in data if n["node_id"] == "e2e-node"), None)


def pgrep_llama() -> set[int]:
    out = subprocess.run(["pgrep", "llama-server"], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


# -- Done when 2: the official openai client, plain and streamed, through both hops ----------------
def test_openai_client_chat_and_stream_through_gateway_and_agent(stack: Stack) -> None:
    client = stack.openai()
    answer = client.chat.completions.create(
        model="planner", messages=HELLO, max_tokens=12, extra_body={"ignore_eos": True}
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 12  # real generated tokens
    assert answer.choices[0].message.content
    assert answer.model == "planner"  # the role, not the model file's path
    pieces: list[str] = []
    finish = None
    stream = client.chat.completions.create(
        model="writer", messages=HELLO, max_tokens=16, stream=True, extra_body={"ignore_eos": True}
    )
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert sum(1 for p in pieces if p) >= 8, f"expected a token-by-token stream, got {pieces}"
    assert finish == "length"
    models = sorted(m.id for m in client.models.list())
    assert models == ["planner", "writer"]


# -- Done when 3: kill -9 of a llama-server child ---------------------------------------------------
def test_killed_llama_server_is_restarted_and_serves_within_15s(stack: Stack) -> None:
    before = stack.llama_pids()
    os.kill(before["planner"], signal.SIGKILL)
    killed_at = time.monotonic()
    wait_until(lambda: serving(stack.gateway, "planner"), 15, "planner served again after kill -9")
    took = time.monotonic() - killed_at
    after = stack.llama_pids()
    assert after["planner"] != before["planner"] and after["writer"] == before["writer"]
    assert took < 15
    assert "exited with signal SIGKILL" in stack.agent.log_text()


# -- Done when 4: gateway restart --------------------------------------------------------------------
def test_gateway_restart_serves_again_within_one_heartbeat_plus_2s(stack: Stack, gateway: Gw) -> None:
    port = stack.gateway.port
    stack.gateway.stop()
    time.sleep(2 * HEARTBEAT_S)  # the agent lives through failed heartbeats meanwhile
    gw = start_gateway(gateway, port=port)  # returns once /health answers
    up_at = time.monotonic()
    wait_until(lambda: serving(gw, "planner", "writer"), HEARTBEAT_S + 2, "discovered aliases served again")
    assert time.monotonic() - up_at < HEARTBEAT_S + 2
    assert (
        "registering again" in stack.agent.log_text() or "registered node e2e-node" in stack.agent.log_text()
    )


# -- Done when 5: loopback only, and the node key is required ------------------------------------------
def test_llama_servers_listen_on_loopback_only_and_agent_needs_the_node_key(stack: Stack) -> None:
    pids = set(stack.llama_pids().values())
    assert len(pids) == 2
    listening = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    addresses: dict[int, list[str]] = {pid: [] for pid in pids}
    for line in listening.splitlines():
        for pid in map(int, re.findall(r"pid=(\d+)", line)):
            if pid in addresses:
                addresses[pid].append(line.split()[3])  # Local Address:Port
    for pid, local in addresses.items():
        # Exactly its own port on loopback: not a wildcard, and not the agent's inherited socket.
        assert len(local) == 1, f"llama-server {pid} listens on {local}"
        assert local[0].startswith("127.0.0.1:"), f"llama-server {pid} listens on {local}"
        assert local[0] != f"127.0.0.1:{stack.agent.port}"
    body = {"model": "planner", "messages": HELLO, "max_tokens": 1}
    r = httpx.post(f"{stack.agent.url}/v1/chat/completions", json=body, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(
        f"{stack.agent.url}/v1/chat/completions", json=body, headers={"X-Api-Key": CLIENT_KEY}, timeout=10
    )
    assert r.status_code == 401  # a client key is not a node key


# -- Done when 6: no llama-server outlives the agent ---------------------------------------------------
def test_sigterm_of_agent_deregisters_and_leaves_no_llama_server(stack: Stack) -> None:
    children = set(stack.llama_pids().values())
    assert len(children) == 2 and children <= pgrep_llama()
    stack.agent.signal(signal.SIGTERM)
    wait_until(lambda: not (children & pgrep_llama()), 5, "no llama-server child left (pgrep)")
    assert not any(alive(p) for p in children)
    assert node_status(stack.gateway) is None  # deregistered, not merely stale
    with stack.gateway.client() as c:
        assert c.get("/ready").status_code == 503


def test_sigkill_of_agent_leaves_no_llama_server_and_node_goes_stale(stack: Stack) -> None:
    children = set(stack.llama_pids().values())
    assert len(children) == 2 and children <= pgrep_llama()
    stack.agent.signal(signal.SIGKILL)
    wait_until(lambda: not (children & pgrep_llama()), 5, "no llama-server child left (pgrep)")
    assert node_status(stack.gateway) == "fresh"
    wait_until(lambda: node_status(stack.gateway) == "stale", STALE_S + 2, "node stale at the gateway")
    with stack.gateway.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "planner", "messages": HELLO})
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_upstream_available"


# -- Done when 1: the README's first command ------------------------------------------------------------
def test_quickstart_smoke_answers_the_guides_curls_in_under_a_minute(llama_server_bin: str) -> None:
    """``bash scripts/quickstart.sh --smoke``: real tokens through gateway and agent, then a clean stop."""
    before = pgrep_llama()
    started = time.monotonic()
    out = subprocess.run(
        ["bash", "scripts/quickstart.sh", "--smoke"],
        cwd=ROOT,
        env={**os.environ, "ROLE_MESH_LLAMA_SERVER": llama_server_bin},
        capture_output=True,
        text=True,
        timeout=300,
    )
    took = time.monotonic() - started
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert took < 60
    text = out.stdout
    assert "curl -sS http://127.0.0.1:8000/v1/models" in text
    assert '"data":[{"id":"planner"' in text and '{"id":"writer"' in text
    assert re.search(r"planner answered with [1-9]\d* generated tokens: (['\"]).+\1", text)  # a repr
    assert 'base_url = "http://127.0.0.1:8000/v1"' in text and 'api_key  = "change-me-client-key"' in text
    assert "deregistered node quickstart-node" in (ROOT / ".rolemesh" / "agent.log").read_text()
    wait_until(lambda: pgrep_llama() <= before, 5, "quickstart's llama-servers gone")


def test_agent_metrics_show_the_llama_servers_counters_rising(stack: Stack) -> None:
    """The agent starts llama-server with --metrics and re-exposes its series with a role label."""
    from prometheus_client.parser import text_string_to_metric_families

    def prompt_tokens() -> float:
        r = httpx.get(f"{stack.agent.url}/metrics", headers={"X-RoleMesh-Node-Key": NODE_KEY}, timeout=10)
        assert r.status_code == 200
        for family in text_string_to_metric_families(r.text):
            for s in family.samples:
                if s.name == "llamacpp:prompt_tokens_total" and s.labels.get("role") == "planner":
                    return float(s.value)
        raise AssertionError("no llamacpp:prompt_tokens_total{role=planner} in the agent's /metrics")

    before = prompt_tokens()
    assert serving(stack.gateway, "planner")
    wait_until(lambda: prompt_tokens() > before, 5, "llamacpp:prompt_tokens_total to rise")
