"""The real node agent as a subprocess, for agent and end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import ROOT, wait_until
from tests.fakes import free_port

AGENT_BIN = Path(sys.executable).parent / "rolemesh-node-agent"


class AgentProcess:
    """``rolemesh-node-agent --config agent.yaml`` on a free port, logging to a file."""

    def __init__(self, config: dict[str, Any], tmp: Path, env: dict[str, str] | None = None) -> None:
        self.port = int(config.setdefault("port", free_port()))
        self.config = config
        self.config_path = tmp / f"agent-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp / f"agent-{self.port}.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, *args: str) -> AgentProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(AGENT_BIN), "--config", str(self.config_path), *args],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._up, 20, f"agent on {self.url} (log: {self.log_path})")
        return self

    def _up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited with {self.proc.returncode}: {self.log_text()}")
        return httpx.get(f"{self.url}/health", timeout=1).status_code == 200

    def roles(self) -> dict[str, str]:
        """Each role's state from the agent's own /health (no key needed)."""
        data: dict[str, str] = httpx.get(f"{self.url}/health", timeout=2).json()["roles"]
        return data

    def wait_ready(self, timeout: float = 60) -> None:
        wait_until(
            lambda: all(s == "ready" for s in self.roles().values()),
            timeout,
            f"every role ready on {self.url} (log: {self.log_path})",
        )

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> int:
        """Send ``sig`` and wait (bounded) for the agent to exit; returns its exit status."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie holds no port and runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
