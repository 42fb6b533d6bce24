"""A client that hangs up mid-generation frees the real llama-server slot within a second."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.agents import AgentProcess
from tests.conftest import CLIENT_KEY, NODE_KEY, ROOT, GatewayProcess, wait_until

HELLO = [{"role": "user", "content": "Tell me a very long story."}]
#: llama-server caps a slot's context at the model's training context; this model declares 32k
#: so that one generation runs for many seconds unless it is cancelled.
LONG_CTX = 32768


@pytest.fixture(scope="module")
def long_model(tiny_model: Path) -> Path:
    path = tiny_model.with_name(f"tiny-llama-ctx{LONG_CTX}.gguf")
    if not path.is_file():
        script = ROOT / "scripts" / "make_tiny_model.py"
        subprocess.run(
            [sys.executable, str(script), "--out", str(path), "--context-length", str(LONG_CTX)],
            check=True,
            timeout=600,
        )
    return path


def _port_of(pid: int) -> int:
    listening = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    for line in listening.splitlines():
        if f"pid={pid}," in line:
            return int(line.split()[3].rsplit(":", 1)[1])
    raise AssertionError(f"llama-server {pid} listens nowhere")


def _busy_slots(port: int) -> int:
    slots = httpx.get(f"http://127.0.0.1:{port}/slots", timeout=5).json()
    return sum(1 for s in slots if s.get("is_processing"))


def test_client_disconnect_frees_the_llama_server_slot_within_1s(
    gateway: Callable[..., GatewayProcess],
    agent: Callable[..., AgentProcess],
    llama_server_bin: str,
    long_model: Path,
) -> None:
    gw = gateway(
        {
            "version": 1,
            "default_model": "writer",
            "auth": {"client_api_keys": [CLIENT_KEY], "node_api_keys": [NODE_KEY]},
            "models": {"writer": {"type": "discovered", "role": "writer"}},
        }
    )
    spec = {
        "model": str(long_model),
        "binary": llama_server_bin,
        "args": [
            "-c",
            str(LONG_CTX),
            "-np",
            "1",
            "-t",
            "1",
            "--threads-http",
            "8",
            "--chat-template",
            "chatml",
        ],
    }
    a = agent(
        {
            "node_id": "cancel-node",
            "gateway_url": gw.url,
            "node_key": NODE_KEY,
            "heartbeat_interval_s": 1,
            "roles": {"writer": {"llama_server": spec}},
        }
    )
    a.wait_ready(60)
    with httpx.Client(headers={"X-RoleMesh-Node-Key": NODE_KEY}, timeout=5) as c:
        info = c.get(f"{a.url}/v1/models").json()["rolemesh"]["roles"]["writer"]
    port = _port_of(int(info["pid"]))
    with gw.client() as c:
        wait_until(
            lambda: (
                c.post(
                    "/v1/chat/completions", json={"model": "writer", "messages": HELLO, "max_tokens": 1}
                ).status_code
                == 200
            ),
            20,
            "the writer role to serve",
        )
    # Streamed: llama-server notices the closed connection at its next token. (For non-streamed
    # requests this llama-server build does not watch the socket while it generates; the gateway
    # and agent still close their upstream connections at once, see test_gateway_http.)
    body = {
        "model": "writer",
        "messages": HELLO,
        "max_tokens": LONG_CTX - 100,
        "stream": True,
        "ignore_eos": True,
    }
    with (
        httpx.Client(base_url=gw.url, headers={"X-Api-Key": CLIENT_KEY}) as c,
        c.stream("POST", "/v1/chat/completions", json=body, timeout=30) as r,
    ):
        assert r.status_code == 200
        # Keep the line iterator referenced: dropping it closes the connection.
        lines = r.iter_lines()
        events = [line for line in (next(lines) for _ in range(20)) if line.startswith("data: {")]
        assert len(events) >= 5
        assert _busy_slots(port) == 1  # generating right now
    hung_up = time.monotonic()
    wait_until(lambda: _busy_slots(port) == 0, 1.0, "the llama-server slot to be freed")
    assert time.monotonic() - hung_up <= 1.0
