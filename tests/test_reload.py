"""Config reload on SIGHUP, without a restart: streams running go on, nodes stay, bad files change nothing."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.agents import AgentProcess
from tests.cli_helpers import listening_port
from tests.conftest import NODE_KEY, GatewayProcess, wait_until
from tests.fakes import FakeUpstream

Gw = Callable[..., GatewayProcess]
Ag = Callable[..., AgentProcess]
Up = Callable[..., FakeUpstream]
OLD_KEY, KEPT_KEY = "key-rotated-out", "key-kept"


def config(aliases: dict[str, str], keys: list[str]) -> dict[str, Any]:
    models: dict[str, Any] = {name: {"type": "proxy", "proxy_url": url} for name, url in aliases.items()}
    models["pool"] = {"type": "discovered", "role": "pool"}
    return {
        "version": 1,
        "default_model": next(iter(aliases)),
        "auth": {"client_api_keys": keys, "node_api_keys": [NODE_KEY]},
        "probes": {"interval_s": 0.3, "timeout_s": 1},
        "models": models,
    }


def reloaded(gw: GatewayProcess, count: int, what: str = "config reloaded from") -> None:
    wait_until(lambda: gw.log_text().count(what) >= count, 10, f"{what!r} x{count} in the log")


def test_sighup_under_the_guides_uvicorn_command(gateway: Gw, upstreams: Up) -> None:
    writer = upstreams("writer", chunks=30, chunk_interval_s=1.0)  # a 30-second stream
    coder = upstreams("coder")
    gw = gateway(config({"writer": writer.url}, [OLD_KEY, KEPT_KEY]), process=True)
    body = {"node_id": "n1", "base_url": writer.url, "roles": ["pool"]}
    r = httpx.post(f"{gw.url}/v1/nodes/register", json=body, headers={"X-RoleMesh-Node-Key": NODE_KEY})
    assert r.status_code == 201

    def long_stream() -> list[str]:
        with (
            httpx.Client(base_url=gw.url, headers={"X-Api-Key": OLD_KEY}, timeout=120) as c,
            c.stream("POST", "/v1/chat/completions", json={"stream": True, "messages": []}) as r,
        ):
            assert r.status_code == 200
            return [line for line in r.iter_lines() if line]

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(long_stream)
        wait_until(lambda: len(writer.seen) == 1, 10, "the stream to start")
        # Reload: an alias added, a key rotated out, a timeout changed.
        new = config({"writer": writer.url, "coder": coder.url}, [KEPT_KEY])
        new["timeouts"] = {"first_byte_s": 60}
        gw.config_path.write_text(yaml.safe_dump(new))
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGHUP)
        reloaded(gw, 1)
        with httpx.Client(base_url=gw.url, timeout=10) as c:
            assert c.post("/v1/chat/completions", json={}, headers={"X-Api-Key": OLD_KEY}).status_code == 401
            kept = {"X-Api-Key": KEPT_KEY}
            wait_until(
                lambda: (
                    c.post("/v1/chat/completions", json={"model": "coder"}, headers=kept).status_code == 200
                ),
                5,
                "the new alias to serve",
            )
            listed = {m["id"] for m in c.get("/v1/models", headers=kept).json()["data"]}
            assert {"writer", "coder", "pool"} <= listed
            # A broken file: refused in one line, and nothing changes.
            gw.config_path.write_text("version: 1\nmodels: [\n")
            gw.proc.send_signal(signal.SIGHUP)
            reloaded(gw, 1, "config reload refused")
            refused = [line for line in gw.log_text().splitlines() if "config reload refused" in line]
            assert len(refused) == 1 and "not valid YAML at line" in refused[0]
            assert c.post("/v1/chat/completions", json={"model": "coder"}, headers=kept).status_code == 200
            # Nodes survive a reload.
            nodes = c.get("/v1/nodes", headers=kept).json()["data"]
            assert [n["node_id"] for n in nodes] == ["n1"]
        lines = running.result(timeout=90)
    # The stream that started before the reload finished, with its old key, undisturbed.
    assert lines[-1] == "data: [DONE]" and len(lines) == 32
    assert gw.proc.poll() is None


def test_sighup_under_rolemesh_gateway(tmp_path: Path, upstreams: Up) -> None:
    writer, coder = upstreams("writer"), upstreams("coder")
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config({"writer": writer.url}, [KEPT_KEY])))
    proc = subprocess.Popen(
        [sys.executable, "-m", "rolemesh_gateway.gateway.cli", "--config", str(path), "--port", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ,
    )
    try:
        url = f"http://127.0.0.1:{listening_port(proc)}"
        kept = {"X-Api-Key": KEPT_KEY}
        assert (
            httpx.post(f"{url}/v1/chat/completions", json={"model": "coder"}, headers=kept).status_code == 404
        )
        path.write_text(yaml.safe_dump(config({"writer": writer.url, "coder": coder.url}, [KEPT_KEY])))
        proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: (
                httpx.post(f"{url}/v1/chat/completions", json={"model": "coder"}, headers=kept).status_code
                == 200
            ),
            10,
            "the reloaded alias",
        )
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


def test_sighup_on_the_agent_adds_removes_and_keeps_roles(gateway: Gw, agent: Ag, upstreams: Up) -> None:
    a_up, b_up = upstreams("a"), upstreams("b")
    gw = gateway(
        {
            "version": 1,
            "default_model": "a",
            "auth": {"client_api_keys": [KEPT_KEY], "node_api_keys": [NODE_KEY]},
            "models": {"a": {"type": "discovered", "role": "a"}, "b": {"type": "discovered", "role": "b"}},
        }
    )
    cfg = {
        "node_id": "n1",
        "gateway_url": gw.url,
        "node_key": NODE_KEY,
        "heartbeat_interval_s": 0.5,
        "probes": {"interval_s": 0.2, "timeout_s": 1},
        "roles": {"a": {"proxy_url": a_up.url}},
    }
    ag = agent(cfg)

    def roles() -> list[str]:
        nodes = httpx.get(f"{gw.url}/v1/nodes", headers={"X-Api-Key": KEPT_KEY}).json()["data"]
        return nodes[0]["roles"] if nodes else []

    wait_until(lambda: roles() == ["a"], 10, "role a registered")
    ag.config_path.write_text(yaml.safe_dump({**cfg, "roles": {"b": {"proxy_url": b_up.url}}}))
    assert ag.proc is not None
    ag.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: roles() == ["b"], 10, "role b instead of a")
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "b"}, headers={"X-Api-Key": KEPT_KEY})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hello from b"
    assert "config reloaded from" in ag.log_text() and "added b; removed a" in ag.log_text()
