"""Supervision of llama-server children, with a small stand-in program that behaves like one.

The stand-in takes the flags the agent passes (``-m``, ``--host``, ``--port``), answers 503 on
``/health`` while "loading", then 200, and offers ``/slots`` and a chat endpoint. Extra flags
make it misbehave: crash at start, ignore SIGTERM, stop answering health checks.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from rolemesh_gateway.agent.config import AgentConfig, parse_config
from rolemesh_gateway.agent.supervisor import ManagedServer, Supervisor
from rolemesh_gateway.common.http1 import Client
from tests.agents import alive
from tests.conftest import wait_until
from tests.fakes import free_port, write_fake_llama_server


def config(tmp_path: Path, *args: str, **supervisor: Any) -> AgentConfig:
    binary, model = write_fake_llama_server(tmp_path)
    spec = {"model": str(model), "binary": str(binary), "args": list(args)}
    return parse_config(
        {
            "node_id": "n1",
            "gateway_url": "http://127.0.0.1:9",
            "roles": {"planner": {"llama_server": spec}},
            "supervisor": {"backoff_initial_s": 0.1, **supervisor},
            "probes": {"interval_s": 0.2, "timeout_s": 5},
        },
        env={},
    )


def run(cfg: AgentConfig, body: Callable[[Supervisor], Awaitable[None]]) -> None:
    """Start a supervisor for ``cfg``, run ``body`` against it, always stop it."""

    async def main() -> None:
        client = Client()
        sup = Supervisor(cfg, client)
        sup.start()
        try:
            async with asyncio.timeout(60):
                await body(sup)
        finally:
            await sup.stop()
            await client.close()

    asyncio.run(main())


async def until(check: Callable[[], bool], limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit_s}s waiting for {what}")
        await asyncio.sleep(0.02)


def server(sup: Supervisor) -> ManagedServer:
    backend = sup.backends["planner"]
    assert isinstance(backend, ManagedServer)
    return backend


def test_starts_on_loopback_waits_for_health_then_serves(tmp_path: Path) -> None:
    async def body(sup: Supervisor) -> None:
        s = server(sup)
        await until(lambda: s.state == "loading", 5, "loading")
        assert not s.ready and sup.ready_roles() == []  # /health answers 503 while loading
        await until(lambda: s.ready, 10, "ready")
        assert sup.ready_roles() == ["planner"]
        assert s.url is not None and s.url.startswith("http://127.0.0.1:")
        async with httpx.AsyncClient() as c:
            info = (await c.get(f"{s.url}/health")).json()
        argv = info["argv"]
        assert argv[argv.index("--host") + 1] == "127.0.0.1"
        assert argv[argv.index("--alias") + 1] == "planner"  # answers name the role
        # Several conversations stay cached: 4 slots, idle ones kept in 2 GiB of host RAM.
        assert argv[argv.index("--parallel") + 1] == "4"
        assert argv[argv.index("--cache-ram") + 1] == "2048"
        assert argv[-2:] == ["--load-delay", "0.5"]  # the role's own args come last
        assert s.describe()["pid"] == info["pid"]

    run(config(tmp_path, "--load-delay", "0.5"), body)


def test_killed_child_is_restarted_and_serves_again(tmp_path: Path) -> None:
    async def body(sup: Supervisor) -> None:
        s = server(sup)
        await until(lambda: s.ready, 10, "ready")
        assert s.proc is not None
        first = s.proc.pid
        os.kill(first, signal.SIGKILL)
        await until(lambda: not s.ready, 5, "crash noticed")
        await until(lambda: s.ready, 10, "restarted")
        assert s.proc is not None and s.proc.pid != first and s.restarts == 1
        assert not alive(first)
        async with httpx.AsyncClient() as c:
            assert (await c.get(f"{s.url}/health")).status_code == 200

    run(config(tmp_path), body)


def test_crash_loop_backs_off_exponentially(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def body(sup: Supervisor) -> None:
        s = server(sup)
        await until(lambda: s.restarts >= 4, 10, "several restarts")
        assert s.state == "restarting" and not s.ready
        assert "exited with status 3 while loading" in s.detail

    caplog.set_level("WARNING", "rolemesh")
    started = time.monotonic()
    run(config(tmp_path, "--crash", "3", backoff_initial_s=0.1, backoff_max_s=0.4), body)
    delays = [r.getMessage() for r in caplog.records if "restarting in" in r.getMessage()]
    assert "restarting in 0.1s" in delays[0] and "restarting in 0.2s" in delays[1]
    assert "restarting in 0.4s" in delays[2] and "restarting in 0.4s" in delays[3]  # capped
    assert "last output: error: failed to load model (simulated)" in delays[0]
    assert time.monotonic() - started >= 0.7


def test_load_timeout_restarts_a_server_that_never_loads(tmp_path: Path) -> None:
    async def body(sup: Supervisor) -> None:
        s = server(sup)
        await until(lambda: s.restarts >= 1, 10, "restart after load timeout")
        assert "did not load within 0.5s (supervisor.load_timeout_s)" in s.detail

    run(config(tmp_path, "--load-delay", "60", load_timeout_s=0.5), body)


def test_unresponsive_server_is_restarted(tmp_path: Path) -> None:
    async def body(sup: Supervisor) -> None:
        s = server(sup)
        await until(lambda: s.ready, 10, "ready")
        await until(lambda: s.restarts >= 1, 10, "restart after failed health checks")
        assert "stopped answering /health (" in s.detail and "/health answered HTTP 500)" in s.detail

    run(config(tmp_path, "--unhealthy-after", "0.3", restart_after_failures=2), body)


def test_stop_sends_term_then_kill_after_grace(tmp_path: Path) -> None:
    pids: list[int] = []

    async def body(sup: Supervisor) -> None:
        s = server(sup)
        await until(lambda: s.ready, 10, "ready")
        assert s.proc is not None
        pids.append(s.proc.pid)

    started = time.monotonic()
    run(config(tmp_path, "--ignore-term", stop_grace_s=0.5), body)
    took = time.monotonic() - started
    assert not alive(pids[0])
    assert took < 8


def test_clean_stop_is_quick(tmp_path: Path) -> None:
    pids: list[int] = []
    stop_times: list[float] = []

    async def body(sup: Supervisor) -> None:
        await until(lambda: server(sup).ready, 10, "ready")
        proc = server(sup).proc
        assert proc is not None
        pids.append(proc.pid)
        t = time.monotonic()
        await sup.stop()
        stop_times.append(time.monotonic() - t)

    run(config(tmp_path, stop_grace_s=30), body)
    assert not alive(pids[0])
    assert stop_times[0] < 2  # SIGTERM was enough; the grace period was not waited out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_no_orphans_when_the_agent_dies(tmp_path: Path, sig: signal.Signals) -> None:
    """The real CLI with the stand-in: after SIGKILL (or SIGTERM) of the agent no child is left."""
    binary, model = write_fake_llama_server(tmp_path)
    cfg = tmp_path / "agent.yaml"
    port = free_port()
    cfg.write_text(
        f"node_id: n1\ngateway_url: http://127.0.0.1:9\nport: {port}\nroles:\n"
        f"  planner: {{llama_server: {{model: {model}, binary: {binary}}}}}\n"
        f"  writer: {{llama_server: {{model: {model}, binary: {binary}}}}}\n"
    )
    log = (tmp_path / "agent.log").open("wb")
    agent = subprocess.Popen(
        [sys.executable, "-m", "rolemesh_gateway.agent.cli", "--config", str(cfg)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def ready() -> bool:
            roles = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()["roles"]
            return all(state == "ready" for state in roles.values())

        wait_until(ready, 20, "both roles ready")
        children = [int(p) for p in subprocess.check_output(["pgrep", "-P", str(agent.pid)]).split()]
        assert len(children) == 2 and all(alive(p) for p in children)
        agent.send_signal(sig)
        agent.wait(20)
        wait_until(lambda: not any(alive(p) for p in children), 5, "children gone")
        if sig == signal.SIGTERM:
            # uvicorn re-raises the signal after its graceful shutdown, as a shell expects.
            assert agent.returncode in (0, -signal.SIGTERM)
            assert "role planner is stopping" in (tmp_path / "agent.log").read_text()
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(5)
        log.close()


def test_children_signalled_with_the_agent_are_not_restarted(tmp_path: Path) -> None:
    """A service manager signals every process of the agent at once (systemd's default): the
    llama-servers exit while the agent still waits for a request in flight; they must stay
    stopped, not be restarted only to be killed again."""
    binary, model = write_fake_llama_server(tmp_path)
    cfg = tmp_path / "agent.yaml"
    port = free_port()
    cfg.write_text(
        f"node_id: n1\ngateway_url: http://127.0.0.1:9\nport: {port}\n"
        "supervisor: {backoff_initial_s: 0.1}\nroles:\n"
        f"  planner: {{llama_server: {{model: {model}, binary: {binary}}}}}\n"
    )
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log:
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rolemesh_gateway.agent.cli",
                "--config",
                str(cfg),
                "--graceful-timeout",
                "3",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: (
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()["roles"]["planner"] == "ready"
            ),
            20,
            "planner ready",
        )
        children = [int(p) for p in subprocess.check_output(["pgrep", "-P", str(agent.pid)]).split()]
        # A request in flight (its body never completes): the agent waits for it on SIGTERM.
        held = socket.create_connection(("127.0.0.1", port))
        held.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
        time.sleep(0.3)
        agent.send_signal(signal.SIGTERM)
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        agent.wait(20)
        held.close()
        text = log_path.read_text()
        assert "not restarting" in text, text[-2000:]
        assert "restarting in" not in text
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(5)
