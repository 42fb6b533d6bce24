"""Supervision of the backends behind each role.

A ``llama_server`` role gets a :class:`ManagedServer`: the agent starts ``llama-server`` on a
free 127.0.0.1 port, waits for its ``/health`` to answer 200 (logging progress while the model
loads, giving up after ``load_timeout_s``), pings it while it runs, and restarts it with
exponential back-off whenever it exits or stops answering. On shutdown it sends SIGTERM to the
child's process group and SIGKILL after ``stop_grace_s``.

No orphans: each child runs in its own process group (so a terminal's Ctrl-C reaches only the
agent, which stops children in order) and asks the kernel for SIGKILL when its parent dies
(``PR_SET_PDEATHSIG``), which covers an agent killed with SIGKILL.

A ``proxy_url`` role gets an :class:`ExternalServer`, which only probes the health path.

Backend states (:data:`BackendState`): ``starting`` -> ``loading`` -> ``ready``; then
``restarting`` after a crash or failed probes (back to ``loading``), ``stopping`` / ``exited``
at shutdown. An external server is ``ready``, ``unreachable`` or ``not ready``. A role started
on demand (:mod:`.ondemand`) is ``cold`` while its server is not running.
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
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from ..common.backoff import Backoff
from ..common.config import Probes, bearer_header
from ..common.http1 import Client
from ..common.probe import probe
from ..common.tasks import TaskOwner
from .config import AgentConfig, LlamaServerSpec, RoleConfig, SupervisorSettings
from .ondemand import SWEEP_S, OnDemand

BackendState = Literal[
    "starting",
    "loading",
    "ready",
    "restarting",
    "stopping",
    "exited",
    "unreachable",
    "not ready",
    "cold",
]

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
    """Runs in the child between fork and exec: SIGKILL me when the agent dies.

    ``preexec_fn`` is documented as unsafe when the parent has threads (a lock held by another
    thread at fork stays held in the child). This function takes no lock: one ``prctl`` call
    through ctypes and ``os.getppid``, both plain system calls.
    """

    def setup() -> None:
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the agent died before prctl took effect
            os._exit(70)

    return setup


class Backend(abc.ABC):
    """The server behind one role, as the proxy and the registration see it."""

    #: Started by the first request that needs it (``start: on_demand``), not with the agent.
    on_demand = False

    def __init__(self, role: str, url: str | None, on_change: Callable[[], None]) -> None:
        self.role = role
        self.url = url
        self.ready = False
        #: Headers every request to this server carries (its ``--api-key``, for a proxy_url role).
        self.auth: list[tuple[bytes, bytes]] = []
        self.state: BackendState = "starting"
        self.detail = ""
        self._on_change = on_change
        #: Set while ready (a request waiting for an on-demand load waits on it).
        self.loaded = asyncio.Event()

    def _set(self, ready: bool, state: BackendState, detail: str = "") -> None:
        changed = ready != self.ready
        self.ready, self.state, self.detail = ready, state, detail
        if ready:
            self.loaded.set()
        else:
            self.loaded.clear()
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
        probes: Probes,
        client: Client,
        on_change: Callable[[], None],
    ) -> None:
        super().__init__(role, rc.proxy_url, on_change)
        self._health_url = f"{rc.proxy_url}{rc.health_path}"
        self._probes = probes
        self._client = client
        self.auth = bearer_header(rc.api_key)

    async def run(self) -> None:
        while True:
            # The gateway's rule for servers it did not start: below 500 is up, 503 is loading.
            result = await probe(self._client, self._health_url, self._probes.timeout_s, headers=self.auth)
            if result.up:
                self._set(True, "ready")
            else:
                self._set(False, "unreachable" if result.status is None else "not ready", result.reason)
            await asyncio.sleep(self._probes.interval_s)


class ManagedServer(Backend):
    """One ``llama-server`` child: start, wait until loaded, watch, restart, stop."""

    def __init__(
        self,
        role: str,
        spec: LlamaServerSpec,
        s: SupervisorSettings,
        probes: Probes,
        client: Client,
        on_change: Callable[[], None],
    ) -> None:
        super().__init__(role, None, on_change)
        self.spec = spec
        self._s = s
        self._probes = probes
        self._client = client
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        #: Set when the agent starts shutting down: a child that exits now is not restarted.
        self.stopping = False
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self.on_demand = spec.start == "on_demand"
        self.load_timeout_s = spec.load_timeout_s or s.load_timeout_s
        #: The setting that gave it, for messages.
        self.load_timeout_key = "supervisor.load_timeout_s"
        if spec.load_timeout_s:
            self.load_timeout_key = f"roles.{role}.llama_server.load_timeout_s"
        if self.on_demand:
            self.state, self.detail = "cold", "starts on the first request"

    def describe(self) -> dict[str, object]:
        pid = self.proc.pid if self.proc and self.proc.returncode is None else None
        return {**super().describe(), "kind": "llama_server", "pid": pid, "restarts": self.restarts}

    async def run(self) -> None:
        backoff = Backoff(self._s.backoff_initial_s, self._s.backoff_max_s)
        while True:
            started = time.monotonic()
            reason = await self._run_once()
            if self.stopping:  # the agent is shutting down (the child got its signal too)
                log.info("role %s: llama-server %s while the agent stops; not restarting", self.role, reason)
                return
            if time.monotonic() - started >= _STABLE_AFTER_S:
                backoff.reset()
            delay = backoff.next()
            self.restarts += 1
            tail = " | ".join(list(self.tail)[-5:])
            log.warning(
                "role %s: llama-server %s; restarting in %.1fs (restart #%d)%s",
                self.role,
                reason,
                delay,
                self.restarts,
                f"; last output: {tail}" if tail else "",
            )
            self._set(False, "restarting", f"{reason}; restarting in {delay:.1f}s")
            await asyncio.sleep(delay)

    async def _run_once(self) -> str:
        """Start one child and supervise it until it is gone; returns why it ended."""
        port = free_port()
        argv = llama_argv(self.spec, self.role, port)
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
        tasks = TaskOwner()
        tasks.start(f"output-{self.role}", self._read_output(proc))
        exited = tasks.start(f"wait-{self.role}", proc.wait())
        try:
            loaded = await self._wait_loaded(proc, exited)
            if loaded is not None:
                return loaded
            self._set(True, "ready")
            return await self._watch(exited)
        finally:
            self._set(False, "stopping" if proc.returncode is None else "exited")
            await self._terminate(proc, exited)
            await tasks.stop()

    async def _wait_loaded(self, proc: asyncio.subprocess.Process, exited: asyncio.Future[int]) -> str | None:
        """Poll ``/health`` until 200; None when loaded, else why it failed."""
        start = time.monotonic()
        deadline = start + self.load_timeout_s
        next_note = start + 5.0
        poll = Backoff(0.05, 0.5)
        while True:
            if exited.done():
                return f"exited with {_exit_text(exited.result())} while loading"
            if (await probe(self._client, f"{self.url}/health", self._probes.timeout_s, strict=True)).up:
                log.info("role %s: llama-server ready after %.1fs", self.role, time.monotonic() - start)
                return None
            now = time.monotonic()
            if now >= deadline:
                return f"did not load within {self.load_timeout_s:g}s ({self.load_timeout_key})"
            if now >= next_note:
                log.info(
                    "role %s: waiting for llama-server (pid %d) to load %s: %.0fs of at most %.0fs",
                    self.role,
                    proc.pid,
                    self.spec.model,
                    now - start,
                    self.load_timeout_s,
                )
                next_note = now + 5.0
            await asyncio.wait({exited}, timeout=poll.next())

    async def _watch(self, exited: asyncio.Future[int]) -> str:
        """Wait for the child to exit, pinging it; returns why it must be restarted."""
        failures = 0
        while True:
            await asyncio.wait({exited}, timeout=self._probes.interval_s)
            if exited.done():
                return f"exited with {_exit_text(exited.result())}"
            up, problem, _ = await probe(
                self._client, f"{self.url}/health", self._probes.timeout_s, strict=True
            )
            if up:
                failures = 0
                continue
            failures += 1
            log.warning(
                "role %s: health check %d/%d failed: %s",
                self.role,
                failures,
                self._s.restart_after_failures,
                problem,
            )
            if failures >= self._s.restart_after_failures:
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


async def _retire(
    role: str, backend: Backend, task: asyncio.Task[Any] | None, idle: Callable[[str], Awaitable[None]]
) -> None:
    """Stop a role that a reload removed or changed, once its requests in flight are done."""
    backend.ready = False  # no new requests; the registration follows the change
    await idle(role)
    if isinstance(backend, ManagedServer):
        backend.stopping = True
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    log.info("role %s: stopped after a config reload", role)


def llama_argv(spec: LlamaServerSpec, role: str, port: int) -> list[str]:
    """The command line of a role's llama-server on ``127.0.0.1:port``.

    The agent owns ``--host``, ``--port`` and ``-m`` (the config refuses them in ``args``) and
    adds ``--alias <role>`` unless one is given, so answers name the role, not a file path,
    ``--metrics`` (unless ``metrics: false``) for the agent's ``/metrics``, and ``--parallel`` and
    ``--cache-ram`` from ``slots`` and ``prompt_cache_mib`` unless ``args`` sets them (or they
    are null: llama-server's own defaults).
    """
    assert spec.binary is not None, "resolved by the config preflight"
    argv = [spec.binary, "-m", spec.model, "--host", "127.0.0.1", "--port", str(port)]
    if not any(a.split("=", 1)[0] in ("-a", "--alias") for a in spec.args):
        argv += ["--alias", role]
    if spec.metrics and "--metrics" not in spec.args:
        argv.append("--metrics")
    given = {a.split("=", 1)[0] for a in spec.args}
    if spec.slots is not None and not given & {"-np", "--parallel"}:
        argv += ["--parallel", str(spec.slots)]
        if not given & {"-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified"}:
            # One KV pool for all slots (what llama-server does when it picks the slot count
            # itself): a long conversation may use the whole context, not a quarter of it.
            argv.append("--kv-unified")
    if spec.prompt_cache_mib is not None and not given & {"-cram", "--cache-ram"}:
        argv += ["--cache-ram", str(spec.prompt_cache_mib)]
    return argv + list(spec.args)


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

    def __init__(self, cfg: AgentConfig, client: Client) -> None:
        self._changed = asyncio.Event()
        self._client = client
        self.backends: dict[str, Backend] = {}
        self._specs: dict[str, object] = {}
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._owner = TaskOwner()
        self._cfg = cfg
        for role, rc in cfg.roles.items():
            self.backends[role] = self._backend(role, rc, cfg)
        self.on_demand = OnDemand(self, cfg.max_running)
        #: Servers being stopped (idle, or for room): a new load of the role waits for the stop.
        self._stopping: dict[str, asyncio.Task[Any]] = {}

    @property
    def owner(self) -> TaskOwner:
        return self._owner

    def _backend(self, role: str, rc: RoleConfig, cfg: AgentConfig) -> Backend:
        self._specs[role] = (rc, cfg.supervisor, cfg.probes)
        if rc.llama_server is not None:
            return ManagedServer(
                role, rc.llama_server, cfg.supervisor, cfg.probes, self._client, self._changed.set
            )
        return ExternalServer(role, rc, cfg.probes, self._client, self._changed.set)

    def start(self) -> None:
        for role, backend in self.backends.items():
            if not backend.on_demand:
                self.launch(role)
        self._owner.every("unload-idle-models", SWEEP_S, self.on_demand.sweep)

    # -- on demand (used by :class:`~.ondemand.OnDemand`) ---------------------------------------
    def managed(self, role: str) -> ManagedServer:
        backend = self.backends[role]
        assert isinstance(backend, ManagedServer)
        return backend

    def launch(self, role: str) -> None:
        """Start supervising ``role``'s server (start it, restart it if it dies)."""
        self._tasks[role] = self._owner.start(f"supervise-{role}", self.backends[role].run())

    def running(self, role: str) -> bool:
        task = self._tasks.get(role)
        return task is not None and not task.done()

    def running_roles(self) -> list[str]:
        """Roles whose llama-server this agent runs now (starting and loading included)."""
        return [r for r, b in self.backends.items() if isinstance(b, ManagedServer) and self.running(r)]

    async def halt(self, role: str, detail: str) -> None:
        """Stop an on-demand role's server (TERM, then KILL); the role is cold afterwards."""
        backend = self.backends[role]
        task = self._tasks.pop(role, None)
        backend._set(False, "stopping", detail)  # at once: no new request goes to it
        if task is not None:
            task.cancel()
            self._stopping[role] = task
            try:
                await asyncio.wait({task})
            finally:
                if self._stopping.get(role) is task:
                    del self._stopping[role]
        if self.backends.get(role) is backend and not self.running(role):
            backend._set(False, "cold", detail)

    async def stopped(self, role: str) -> None:
        """Return once a stop of ``role``'s server in progress is over."""
        task = self._stopping.get(role)
        if task is not None:
            await asyncio.wait({task})

    def exiting(self) -> None:
        """The agent got SIGTERM or SIGINT: children that exit from now on stay stopped.

        A service manager signals the whole process group, so llama-server may exit before the
        agent has finished its in-flight requests; restarting it then would only be killed again.
        """
        for backend in self.backends.values():
            if isinstance(backend, ManagedServer):
                backend.stopping = True

    async def stop(self) -> None:
        """Stop every child (in parallel: TERM, then KILL after the grace period)."""
        self.exiting()
        await self._owner.stop()

    def apply(
        self, cfg: AgentConfig, idle: Callable[[str], Awaitable[None]]
    ) -> tuple[list[str], list[str], list[str]]:
        """Switch to a reloaded config: roles added start now; roles removed or changed stop after
        their requests in flight (``idle(role)`` waits for those), and a changed one starts again
        with its new settings. Other roles are left alone. Returns (added, removed, changed)."""
        added = [r for r in cfg.roles if r not in self.backends]
        removed = [r for r in self.backends if r not in cfg.roles]
        changed = [
            r
            for r, rc in cfg.roles.items()
            if r in self.backends and self._specs.get(r) != (rc, cfg.supervisor, cfg.probes)
        ]
        self._cfg = cfg
        for role in removed + changed:
            old = self.backends.pop(role)
            task = self._tasks.pop(role, None)
            self._owner.start(f"retire-{role}", _retire(role, old, task, idle))
        self.on_demand.max_running = cfg.max_running
        for role in added + changed:
            backend = self.backends[role] = self._backend(role, cfg.roles[role], cfg)
            if not backend.on_demand:
                self.launch(role)
        if added or removed or changed:
            self._changed.set()
        return added, removed, changed

    def ready_roles(self) -> list[str]:
        """The roles this node can serve: ready, or loaded on demand (then maybe cold)."""
        return [role for role, b in self.backends.items() if b.ready or b.on_demand]

    def cold_roles(self) -> list[str] | None:
        """On-demand roles whose server is not ready: a request waits for a load.

        None when no role is on demand, so that such an agent's messages stay as they were.
        """
        if not any(b.on_demand for b in self.backends.values()):
            return None
        return [role for role, b in self.backends.items() if b.on_demand and not b.ready]

    def ready_backends(self) -> dict[str, Backend]:
        """The backends that can serve now, by role."""
        return {role: b for role, b in self.backends.items() if b.ready and b.url}

    def slot_urls(self) -> list[str]:
        """The ``/slots`` URL of every ready backend (llama-server reports its slot use there)."""
        return [f"{b.url}/slots" for b in self.ready_backends().values()]

    async def wait_for_change(self, timeout_s: float) -> None:
        """Return when a backend became ready or stopped being ready, or after ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._changed.wait()
        except TimeoutError:
            pass
        self._changed.clear()
