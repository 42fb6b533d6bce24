"""The real node agent as a subprocess, for agent and end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import ServiceProcess, wait_until
from tests.fakes import free_port

AGENT_BIN = Path(sys.executable).parent / "rolemesh-node-agent"


class AgentProcess(ServiceProcess):
    """``rolemesh-node-agent --config agent.yaml`` on a free port, logging to a file."""

    name = "agent"
    stop_grace_s = 30.0  # the agent stops its llama-servers first

    def __init__(self, config: dict[str, Any], tmp: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(int(config.setdefault("port", free_port())), tmp, {**os.environ, **(env or {})})
        self.config = config
        self.config_path = tmp / f"agent-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))

    def start(self, *args: str) -> AgentProcess:
        self._launch([str(AGENT_BIN), "--config", str(self.config_path), *args], wait=True)
        return self

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

    def signal_nowait(self, sig: int) -> None:
        """Send ``sig`` and return at once (the test watches what happens meanwhile)."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def signal(self, sig: int) -> int:
        """Send ``sig`` and wait (bounded) for the agent to exit; returns its exit status."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(30)


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie holds no port and runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
