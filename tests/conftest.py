"""Shared fixtures: real fake upstreams and the real gateway as a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import yaml

from rolemesh_gateway.common import asgi
from tests.fakes import FakeUpstream, free_port

# The in-process servers of the tests share pytest's process: freezing it at each start-up would
# keep every test's garbage for good (and hides objects from Hypothesis's gc checks). Servers
# started as programs freeze as in production (tests/test_asgi.py checks it).
asgi.FREEZE_AT_STARTUP = False

if TYPE_CHECKING:
    from tests.agents import AgentProcess

ROOT = Path(__file__).resolve().parent.parent
CLIENT_KEY = "test-client-key"
NODE_KEY = "test-node-key"


def wait_until(check: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> None:
    """Poll ``check`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class ServiceProcess:
    """One of our programs as a subprocess on a free port, its output in a log file."""

    name = "service"
    stop_grace_s = 10.0

    def __init__(self, port: int, tmp: Path, env: dict[str, str]) -> None:
        self.port = port
        self.log_path = tmp / f"{self.name}-{port}.log"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _launch(self, argv: list[str], wait: bool) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if wait:
            wait_until(self._up, 20, f"{self.name} on {self.url} (log: {self.log_path})")

    def _up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}: {self.log_text()}")
        return httpx.get(f"{self.url}/health", timeout=1).status_code == 200

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class GatewayProcess(ServiceProcess):
    """``uvicorn rolemesh_gateway.main:app`` exactly as the guide runs it, on a free port."""

    name = "gateway"

    def __init__(
        self,
        config: dict[str, Any] | str,
        tmp: Path,
        env: dict[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        port = port or free_port()
        self.config_path = tmp / f"gateway-{port}.yaml"
        text = config if isinstance(config, str) else yaml.safe_dump(config)
        self.config_path.write_text(text)
        super().__init__(port, tmp, {**os.environ, "ROLE_MESH_CONFIG": str(self.config_path), **(env or {})})

    def start(self, wait: bool = True) -> GatewayProcess:
        argv = [sys.executable, "-m", "uvicorn", "rolemesh_gateway.main:app"]
        self._launch([*argv, "--host", "127.0.0.1", "--port", str(self.port)], wait)
        return self

    def stop(self) -> None:
        super().stop()
        self.proc = None  # a gateway may be started again on the same port

    def client(self, key: str | None = CLIENT_KEY) -> httpx.Client:
        headers = {"X-Api-Key": key} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)


@pytest.fixture
def upstreams() -> Iterator[Callable[..., FakeUpstream]]:
    started: list[FakeUpstream] = []

    def make(name: str = "fake", **kw: Any) -> FakeUpstream:
        up = FakeUpstream(name, **kw).start()
        started.append(up)
        return up

    yield make
    for up in started:
        up.stop()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Start gateways: in this process by default, as the guide's uvicorn command if ``process``."""
    from tests.serve import InProcessGateway

    started: list[GatewayProcess | InProcessGateway] = []

    def make(
        config: dict[str, Any] | str,
        env: dict[str, str] | None = None,
        port: int | None = None,
        wait: bool = True,
        process: bool = False,
    ) -> GatewayProcess:
        gw: GatewayProcess | InProcessGateway
        gw = GatewayProcess(config, tmp_path, env, port) if process else InProcessGateway(config, env, port)
        started.append(gw)
        return gw.start(wait)  # type: ignore[return-value]  # the same interface

    yield make
    for gw in started:
        gw.stop()


def proxy_config(**aliases: str) -> dict[str, Any]:
    """A config with client/node keys and one proxy alias per keyword (alias=url)."""
    first = next(iter(aliases))
    return {
        "version": 1,
        "default_model": first,
        "auth": {"client_api_keys": [CLIENT_KEY], "node_api_keys": [NODE_KEY]},
        "probes": {"interval_s": 0.3, "timeout_s": 0.5},
        "models": {a: {"type": "proxy", "openai_model_name": a, "proxy_url": u} for a, u in aliases.items()},
    }


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start ``rolemesh-node-agent`` processes; all are stopped after the test."""
    from tests.agents import AgentProcess  # here: tests.agents imports this module

    started: list[AgentProcess] = []

    def make(config: dict[str, Any], *args: str, env: dict[str, str] | None = None) -> AgentProcess:
        a = AgentProcess(config, tmp_path, env)
        started.append(a)
        return a.start(*args)

    yield make
    for a in started:
        a.stop()


@pytest.fixture
def fake_files(tmp_path: Path) -> dict[str, str]:
    """A model file and an executable that stand in for a GGUF and llama-server (config tests)."""
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    return {"model": str(model), "binary": str(binary), "dir": str(tmp_path)}
