"""Supervision of the backends behind each role.

A ``llama_server`` role gets a :class:`ManagedServer`: the agent starts ``llama-server`` on a
free 127.0.0.1 port, waits for its ``/health`` to answer 200 (logging progress while the model
loads, giving up after ``load_timeout_s``), pings it while it runs, and restarts it with
exponential back-off whenever it exits or stops answering. On shutdown it sends SIGTERM to the
child's process group and SIGKILL after ``stop_grace_s``.

No orphans: each child runs in its own process group (so a terminal's Ctrl-C reaches only the
agent, which stops children in order) and asks the kernel for SIGKILL when its parent dies
(``PR_SET_PDEATHSIG``), which covers an agent killed with SIGKILL.

A ``url`` role gets an :class:`ExternalServer`, which only probes the health path.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from ..errors import GatewayError
from ..tasks import TaskOwner
from ..upstream import UpstreamClient
from .config import AgentConfig, LlamaServerSpec, RoleConfig, SupervisorSettings

log = logging.getLogger("rolemesh.agent.supervisor")

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_TAIL_LINES = 30
#: A server that stayed up this long has recovered: its next crash restarts quickly again.
_STABLE_AFTER_S = 60.0


def free_port() -> int:
    """A port that is free on 127.0.0.1 right now (the child binds it moments later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """Runs in the child between fork and exec: SIGKILL me when the agent dies."""

    def setup() -> None:
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the agent died before prctl took effect
            os._exit(70)

    return setup


class Backend(abc.ABC):
    """The server behind one role, as the proxy and the registration see it."""

    def __init__(self, role: str, url: str | None, on_change: Callable[[], None]) -> None:
        self.role = role
        self.url = url
        self.ready = False
        self.state = "starting"
        self.detail = ""
        self._on_change = on_change

    def _set(self, ready: bool, state: str, detail: str = "") -> None:
        changed = ready != self.ready
        self.ready, self.state, self.detail = ready, state, detail
        if changed:
            log.info(
                "role %s is %s%s", self.role, "ready" if ready else state, f": {detail}" if detail else ""
            )
            self._on_change()

    @abc.abstractmethod
    async def run(self) -> None:
        """Watch (and for llama-server, start and restart) the server until cancelled."""

    def describe(self) -> dict[str, object]:
        return {"ready": self.ready, "state": self.state, "detail": self.detail, "kind": "url"}


class ExternalServer(Backend):
    """A server that runs on its own (llamafile, vLLM...): only probed, never started."""

    def __init__(
        self,
        role: str,
        rc: RoleConfig,
        s: SupervisorSettings,
        client: UpstreamClient,
        on_change: Callable[[], None],
    ) -> None:
        super().__init__(role, rc.url, on_change)
        self._health_url = f"{rc.url}{rc.health_path}"
        self._s = s
        self._client = client

    async def run(self) -> None:
        while True:
            try:
                status = await self._client.get(self._health_url, self._s.health_timeout_s)
            except GatewayError as exc:
                self._set(False, "unreachable", exc.message)
            else:
                # Like the gateway: any answer below 500 means up; 503 means still loading.
                if status < 500:
                    self._set(True, "ready")
                else:
                    self._set(False, "not ready", f"{self._health_url} answered HTTP {status}")
            await asyncio.sleep(self._s.health_interval_s)


class ManagedServer(Backend):
    """One ``llama-server`` child: start, wait until loaded, watch, restart, stop."""

    def __init__(
        self,
        role: str,
        spec: LlamaServerSpec,
        s: SupervisorSettings,
        client: UpstreamClient,
        on_change: Callable[[], None],
    ) -> None:
        super().__init__(role, None, on_change)
        self.spec = spec
        self._s = s
        self._client = client
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)

    def describe(self) -> dict[str, object]:
        pid = self.proc.pid if self.proc and self.proc.returncode is None else None
        return {**super().describe(), "kind": "llama_server", "pid": pid, "restarts": self.restarts}

    async def run(self) -> None:
        backoff = self._s.backoff_initial_s
        while True:
            started = time.monotonic()
            reason = await self._run_once()
            if time.monotonic() - started >= _STABLE_AFTER_S:
                backoff = self._s.backoff_initial_s
            self.restarts += 1
            tail = " | ".join(list(self.tail)[-5:])
            log.warning(
                "role %s: llama-server %s; restarting in %.1fs (restart #%d)%s",
                self.role,
                reason,
                backoff,
                self.restarts,
                f"; last output: {tail}" if tail else "",
            )
            self._set(False, "restarting", f"{reason}; restarting in {backoff:.1f}s")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._s.backoff_max_s)

    async def _run_once(self) -> str:
        """Start one child and supervise it until it is gone; returns why it ended."""
        port = free_port()
        assert self.spec.binary is not None  # resolved by the config preflight
        argv = [self.spec.binary, "-m", self.spec.model, "--host", "127.0.0.1", "--port", str(port)]
        if not any(a.split("=", 1)[0] in ("-a", "--alias") for a in self.spec.args):
            argv += ["--alias", self.role]  # answers name the role, not the model file's path
        argv += self.spec.args
        log.info("role %s: starting %s", self.role, " ".join(argv))
        self.tail.clear()
        self._set(False, "loading", f"starting llama-server on 127.0.0.1:{port}")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()),
            )
        except OSError as exc:
            return f"could not be started ({exc})"
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        reader = asyncio.get_running_loop().create_task(self._read_output(proc), name=f"output-{self.role}")
        exited = asyncio.ensure_future(proc.wait())
        try:
            loaded = await self._wait_loaded(proc, exited)
            if loaded is not None:
                return loaded
            self._set(True, "ready")
            return await self._watch(exited)
        finally:
            self._set(False, "stopping" if proc.returncode is None else "exited")
            await self._terminate(proc, exited)
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _wait_loaded(self, proc: asyncio.subprocess.Process, exited: asyncio.Future[int]) -> str | None:
        """Poll ``/health`` until 200; None when loaded, else why it failed."""
        start = time.monotonic()
        deadline = start + self._s.load_timeout_s
        next_note = start + 5.0
        delay = 0.05
        while True:
            if exited.done():
                return f"exited with {_exit_text(exited.result())} while loading"
            try:
                if await self._client.get(f"{self.url}/health", self._s.health_timeout_s) == 200:
                    log.info("role %s: llama-server ready after %.1fs", self.role, time.monotonic() - start)
                    return None
            except GatewayError:
                pass  # not listening yet
            now = time.monotonic()
            if now >= deadline:
                return f"did not load within {self._s.load_timeout_s:g}s (supervisor.load_timeout_s)"
            if now >= next_note:
                log.info(
                    "role %s: waiting for llama-server (pid %d) to load %s: %.0fs of at most %.0fs",
                    self.role,
                    proc.pid,
                    self.spec.model,
                    now - start,
                    self._s.load_timeout_s,
                )
                next_note = now + 5.0
            await asyncio.wait({exited}, timeout=delay)
            delay = min(delay * 2, 0.5)

    async def _watch(self, exited: asyncio.Future[int]) -> str:
        """Wait for the child to exit, pinging it; returns why it must be restarted."""
        failures = 0
        while True:
            await asyncio.wait({exited}, timeout=self._s.health_interval_s)
            if exited.done():
                return f"exited with {_exit_text(exited.result())}"
            try:
                status = await self._client.get(f"{self.url}/health", self._s.health_timeout_s)
                problem = None if status == 200 else f"health answered HTTP {status}"
            except GatewayError as exc:
                problem = exc.message
            if problem is None:
                failures = 0
                continue
            failures += 1
            log.warning(
                "role %s: health check %d/%d failed: %s",
                self.role,
                failures,
                self._s.unhealthy_after,
                problem,
            )
            if failures >= self._s.unhealthy_after:
                return f"stopped answering /health ({problem})"

    async def _terminate(self, proc: asyncio.subprocess.Process, exited: asyncio.Future[int]) -> None:
        """SIGTERM the child's process group, SIGKILL after the grace period, and reap it."""
        if exited.done():
            return
        _signal_group(proc.pid, signal.SIGTERM)
        done, _ = await asyncio.wait({exited}, timeout=self._s.stop_grace_s)
        if not done:
            log.warning(
                "role %s: llama-server (pid %d) ignored SIGTERM for %.0fs; killing it",
                self.role,
                proc.pid,
                self._s.stop_grace_s,
            )
            _signal_group(proc.pid, signal.SIGKILL)
            await asyncio.wait({exited}, timeout=5.0)

    async def _read_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            text = line.decode("utf-8", "replace").rstrip()
            self.tail.append(text)
            log.debug("llama-server[%s]: %s", self.role, text)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


class Supervisor:
    """All the role backends of one agent, each supervised by its own named task."""

    def __init__(self, cfg: AgentConfig, client: UpstreamClient) -> None:
        self.changed = asyncio.Event()
        self.backends: dict[str, Backend] = {}
        for role, rc in cfg.roles.items():
            if rc.llama_server is not None:
                self.backends[role] = ManagedServer(
                    role, rc.llama_server, cfg.supervisor, client, self.changed.set
                )
            else:
                self.backends[role] = ExternalServer(role, rc, cfg.supervisor, client, self.changed.set)
        self._tasks = TaskOwner()

    def start(self) -> None:
        for role, backend in self.backends.items():
            self._tasks.start(f"supervise-{role}", backend.run())

    async def stop(self) -> None:
        """Stop every child (in parallel: TERM, then KILL after the grace period)."""
        await self._tasks.stop()

    def ready_roles(self) -> list[str]:
        return [role for role, b in self.backends.items() if b.ready]
