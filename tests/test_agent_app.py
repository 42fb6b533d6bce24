"""The node agent as users run it (``rolemesh-node-agent`` subprocess), with real fake servers.

Roles point at :class:`FakeUpstream` servers (``url`` roles) or at the stand-in llama-server of
``test_agent_supervisor`` (``llama_server`` roles); the gateway is the real one, as a subprocess.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.agents import AGENT_BIN, AgentProcess
from tests.conftest import CLIENT_KEY, NODE_KEY, GatewayProcess, wait_until
from tests.fakes import FakeUpstream, free_port, write_fake_llama_server

Up = Callable[..., FakeUpstream]
Gw = Callable[..., GatewayProcess]
Ag = Callable[..., AgentProcess]
KEY = {"X-RoleMesh-Node-Key": NODE_KEY}
STALE_S = 3.0
INTERVAL_S = 0.5


def agent_config(gateway_url: str = "http://127.0.0.1:9", **roles: Any) -> dict[str, Any]:
    return {
        "node_id": "gpu-box-1",
        "gateway_url": gateway_url,
        "node_key": NODE_KEY,
        "heartbeat_interval_s": INTERVAL_S,
        "supervisor": {"backoff_initial_s": 0.1},
        "probes": {"interval_s": 0.2, "timeout_s": 1},
        "roles": roles,
    }


def gateway_config() -> dict[str, Any]:
    return {
        "version": 1,
        "default_model": "planner",
        "auth": {"client_api_keys": [CLIENT_KEY], "node_api_keys": [NODE_KEY]},
        "nodes": {"stale_after_s": STALE_S},
        "models": {
            "planner": {"type": "discovered", "role": "planner"},
            "writer": {"type": "discovered", "role": "writer"},
        },
    }


def chat(url: str, model: str, headers: dict[str, str] | None = None, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=10)


def get(gw: GatewayProcess, path: str) -> httpx.Response:
    with gw.client() as c:
        return c.get(path)


def nodes(gw: GatewayProcess) -> dict[str, dict[str, Any]]:
    return {n["node_id"]: n for n in get(gw, "/v1/nodes").json()["data"]}


def test_node_key_required_except_health(upstreams: Up, agent: Ag) -> None:
    a = agent(agent_config(planner={"url": upstreams("planner").url}))
    health = httpx.get(f"{a.url}/health")
    assert health.status_code == 200 and health.json()["node_id"] == "gpu-box-1"
    for headers in (None, {"X-RoleMesh-Node-Key": "wrong"}, {"X-Api-Key": CLIENT_KEY}):
        r = chat(a.url, "planner", headers)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
        assert "node key" in r.json()["error"]["message"]
        assert httpx.get(f"{a.url}/v1/models", headers=headers).status_code == 401
    assert chat(a.url, "planner", KEY).status_code == 200
    # The node key may also travel as a bearer token (an OpenAI client pointed at the agent).
    client = openai.OpenAI(base_url=f"{a.url}/v1", api_key=NODE_KEY, max_retries=0)
    answer = client.chat.completions.create(model="planner", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "hello from planner"


def test_routes_by_role_and_never_forwards_the_key(upstreams: Up, agent: Ag) -> None:
    planner, writer = upstreams("planner"), upstreams("writer")
    a = agent(agent_config(planner={"url": planner.url}, writer={"url": writer.url}))
    a.wait_ready()
    r = chat(a.url, "writer", {**KEY, "X-Request-ID": "req-42"})
    assert r.json()["choices"][0]["message"]["content"] == "hello from writer"
    seen = writer.seen[-1]
    assert seen.body["model"] == "writer"
    assert "x-rolemesh-node-key" not in {k.lower() for k in seen.headers}
    assert seen.headers.get("X-Request-ID") == "req-42"
    assert chat(a.url, "planner", KEY).json()["choices"][0]["message"]["content"] == "hello from planner"
    models = httpx.get(f"{a.url}/v1/models", headers=KEY).json()
    assert sorted(m["id"] for m in models["data"]) == ["planner", "writer"]


def test_errors_are_openai_shaped(upstreams: Up, agent: Ag) -> None:
    a = agent(agent_config(planner={"url": upstreams("planner").url}, writer={"url": "http://127.0.0.1:9"}))
    wait_until(lambda: a.roles() == {"planner": "ready", "writer": "unreachable"}, 10, "role states")
    unknown = chat(a.url, "coder", KEY)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert "serves no role 'coder'; it serves: planner, writer" in unknown.json()["error"]["message"]
    down = chat(a.url, "writer", KEY)
    assert down.status_code == 503 and down.json()["error"]["code"] == "no_upstream_available"
    assert "role 'writer' on node gpu-box-1 is unreachable" in down.json()["error"]["message"]
    bad = httpx.post(f"{a.url}/v1/chat/completions", content=b"{nope", headers=KEY)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    assert httpx.get(f"{a.url}/v1/chat/completions", headers=KEY).status_code == 405
    assert httpx.get(f"{a.url}/admin", headers=KEY).status_code == 404


def test_stream_is_relayed_as_it_is_produced(upstreams: Up, agent: Ag) -> None:
    up = upstreams("writer", chunks=4, chunk_interval_s=0.4)
    a = agent(agent_config(writer={"url": up.url}))
    a.wait_ready()
    body = {"model": "writer", "stream": True, "messages": []}
    arrivals: list[float] = []
    start = time.monotonic()
    with httpx.stream("POST", f"{a.url}/v1/chat/completions", json=body, headers=KEY, timeout=10) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 5
    assert arrivals[-1] - arrivals[0] > 1.0  # each chunk was relayed when produced, not at the end


class SilentUpstream:
    """Accepts requests and never answers them; records when the caller closes the connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requested = threading.Event()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed by stop()
            with conn:
                data = conn.recv(65536)
                if data.startswith(b"GET /health"):
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    continue
                self.requested.set()
                while conn.recv(65536):
                    pass
                self.closed.set()

    def stop(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


def test_client_disconnect_cancels_the_upstream_request(agent: Ag) -> None:
    """A caller that hangs up closes the agent's upstream connection (llama.cpp frees the slot)."""
    up = SilentUpstream()
    try:
        a = agent(agent_config(writer={"url": up.url}))
        a.wait_ready()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{a.url}/v1/chat/completions", json={"model": "writer"}, headers=KEY, timeout=1)
        assert up.requested.is_set()
        assert up.closed.wait(3), "the agent kept the upstream request open after the caller left"
        a.stop()
    finally:
        up.stop()


def test_registers_ready_roles_with_load_and_serves_through_the_gateway(
    upstreams: Up, gateway: Gw, agent: Ag, tmp_path: Path
) -> None:
    gw = gateway(gateway_config())
    binary, model = write_fake_llama_server(tmp_path)
    a = agent(
        agent_config(
            gw.url,
            planner={"llama_server": {"model": str(model), "binary": str(binary), "args": ["--slots", "4"]}},
            writer={"url": upstreams("writer").url},
        )
    )
    wait_until(lambda: get(gw, "/ready").status_code == 200, 10, "gateway ready via the agent")
    wait_until(lambda: nodes(gw)["gpu-box-1"].get("slots_total") == 4, 5, "slot use in a heartbeat")
    node = nodes(gw)["gpu-box-1"]
    assert node["base_url"] == a.url and sorted(node["roles"]) == ["planner", "writer"]
    assert node["status"] == "fresh" and node["slots_busy"] == 1
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=CLIENT_KEY, max_retries=0)
    answer = client.chat.completions.create(model="planner", messages=[{"role": "user", "content": "hi"}])
    assert (answer.choices[0].message.content or "").startswith("fake llama ")
    answer = client.chat.completions.create(model="writer", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "hello from writer"


def test_a_role_that_goes_down_is_withdrawn_then_comes_back(upstreams: Up, gateway: Gw, agent: Ag) -> None:
    gw = gateway(gateway_config())
    writer = upstreams("writer")
    port = writer.port
    agent(agent_config(gw.url, planner={"url": upstreams("planner").url}, writer={"url": writer.url}))
    models = lambda: get(gw, "/v1/models").json()  # noqa: E731
    wait_until(lambda: sorted(m["id"] for m in models()["data"]) == ["planner", "writer"], 10, "both roles")
    writer.stop()
    wait_until(lambda: models()["rolemesh"]["unavailable_models"] == ["writer"], 5, "writer withdrawn")
    assert nodes(gw)["gpu-box-1"]["roles"] == ["planner"]
    upstreams("writer", port=port)
    wait_until(lambda: models()["rolemesh"]["unavailable_models"] == [], 5, "writer back")


def test_gateway_restart_and_late_gateway_are_followed_by_registration(
    gateway: Gw, agent: Ag, upstreams: Up
) -> None:
    port = free_port()
    # The agent starts first: the gateway is not there yet, so it keeps retrying.
    a = agent(agent_config(f"http://127.0.0.1:{port}", planner={"url": upstreams("planner").url}))
    wait_until(lambda: "cannot connect to gateway" in a.log_text(), 10, "agent notices the missing gateway")
    gw = gateway(gateway_config(), port=port)
    wait_until(lambda: get(gw, "/ready").status_code == 200, INTERVAL_S + 2, "registered")
    gw.stop()
    time.sleep(2 * INTERVAL_S)  # the agent must live through a few failed heartbeats
    gw = gateway(gateway_config(), port=port)
    t = time.monotonic()
    wait_until(lambda: get(gw, "/ready").status_code == 200, INTERVAL_S + 2, "re-registered")
    assert time.monotonic() - t < INTERVAL_S + 2
    assert "registering again" in a.log_text() or "registered node gpu-box-1" in a.log_text()


@pytest.mark.parametrize(("sig", "deregistered"), [(signal.SIGTERM, True), (signal.SIGKILL, False)])
def test_agent_exit_deregisters_or_goes_stale(
    upstreams: Up, gateway: Gw, agent: Ag, sig: signal.Signals, deregistered: bool
) -> None:
    gw = gateway(gateway_config())
    a = agent(agent_config(gw.url, planner={"url": upstreams("planner").url}))
    wait_until(lambda: "gpu-box-1" in nodes(gw), 10, "registered")
    a.signal(sig)
    if deregistered:
        wait_until(lambda: "gpu-box-1" not in nodes(gw), 2, "deregistered")
        assert "deregistered node gpu-box-1" in a.log_text()
    else:
        assert nodes(gw)["gpu-box-1"]["status"] == "fresh"
        wait_until(lambda: nodes(gw)["gpu-box-1"]["status"] == "stale", STALE_S + 2, "stale")
    assert get(gw, "/ready").status_code == 503


def test_refuses_public_bind_without_node_key(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        "node_id: n1\ngateway_url: http://10.0.0.1:8000\nroles: {p: {url: 'http://127.0.0.1:9'}}\n"
    )

    def public_bind() -> subprocess.CompletedProcess[str]:
        argv = [str(AGENT_BIN), "--config", str(cfg), "--host", "0.0.0.0", "--port", str(free_port())]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)

    out = public_bind()
    assert out.returncode == 2
    assert "advertise_url is required when host is 0.0.0.0" in out.stderr
    cfg.write_text(cfg.read_text() + "advertise_url: http://10.0.0.5:8091\n")
    out = public_bind()
    assert out.returncode == 2
    assert "refusing to listen on 0.0.0.0 without node_key" in out.stderr


@pytest.mark.parametrize(
    "raw",
    [
        b"/v1/a%09HTTP/1.0%09x",  # a tab in the request line a lenient server would split on
        b"/v1/a%00b",
        b"/v1/a%7Fb",
        b"/v1/slots%2F..%2F..%2Fslots",  # dot segments, once decoded
        b"/v1/./chat/completions",
    ],
)
def test_odd_paths_are_refused_with_an_openai_error_and_never_reach_the_server(
    upstreams: Up, agent: Ag, raw: bytes
) -> None:
    """Audit findings 9 and 15: the agent forwarded the decoded path (control characters, dot
    segments) and a non-Latin-1 one crashed it with a plain 500."""
    up = upstreams("planner")
    a = agent(agent_config(planner={"url": up.url}))
    a.wait_ready(10)  # else a loaded machine answers 503 "starting" before looking at the path
    with socket.create_connection(("127.0.0.1", a.port), timeout=10) as s:
        body = b'{"model": "planner"}'
        s.sendall(
            b"POST "
            + raw
            + b" HTTP/1.1\r\nhost: x\r\nx-rolemesh-node-key: "
            + NODE_KEY.encode()
            + b"\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % len(body)
            + body
        )
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert json.loads(payload)["error"]["type"] == "invalid_request_error"
    assert up.seen == []


def test_a_non_latin1_path_is_forwarded_encoded_not_crashed(upstreams: Up, agent: Ag) -> None:
    up = upstreams("planner")
    a = agent(agent_config(planner={"url": up.url}))
    r = httpx.post(f"{a.url}/v1/%E2%82%AC", json={"model": "planner"}, headers=KEY)
    assert r.status_code == 404  # the server's own answer (it has no such path), relayed
    assert "Traceback" not in a.log_text() and "UnicodeEncodeError" not in a.log_text()


def test_an_on_demand_role_that_cannot_load_answers_503_with_the_reason(agent: Ag, tmp_path: Path) -> None:
    binary, model = write_fake_llama_server(tmp_path)
    spec = {"model": str(model), "binary": str(binary), "start": "on_demand"}
    a = agent(
        agent_config(
            planner={"llama_server": {**spec, "args": ["--crash", "1"]}},
            writer={"llama_server": spec},
        )
    )
    assert a.roles() == {"planner": "cold", "writer": "cold"}
    r = chat(a.url, "planner", headers=KEY)
    assert r.status_code == 503
    message = r.json()["error"]["message"]
    assert message.startswith("role 'planner' on node gpu-box-1 could not be loaded: exited with status")
    assert a.roles()["planner"] == "cold" and a.children() == []  # no restart loop for nobody
    r = chat(a.url, "writer", headers=KEY)  # the other role loads and answers
    assert r.status_code == 200 and a.roles()["writer"] == "ready"
    metrics = httpx.get(f"{a.url}/metrics", headers=KEY, timeout=5).text
    assert 'rolemesh_agent_requests_total{role="planner",status="503"} 1.0' in metrics
    assert 'rolemesh_agent_model_loads_total{role="writer"} 1.0' in metrics
