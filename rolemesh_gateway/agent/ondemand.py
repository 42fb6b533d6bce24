"""Models on demand: start a role's llama-server when a request needs it, stop it when idle.

A role whose ``llama_server`` says ``start: on_demand`` is registered with the gateway as
*cold* (it can serve, after a load) and its server is not started with the agent. The first
request starts it and waits until its ``/health`` answers 200 (at most ``load_timeout_s``);
requests that arrive meanwhile wait for the same load: one load task per role, shared. After
``idle_unload_s`` with nothing in flight the server is stopped and the role is cold again.

``max_running`` bounds how many llama-servers run on the host at once. A load that finds no
room stops the least recently used on-demand server that has nothing in flight; when every
running server is busy it waits for one to become idle, and gives up with a 503 and the reason
after ``load_timeout_s``. A server with a request or stream in flight is never stopped: a
request counts as in flight from its arrival (before it waits for a load) to its last byte.

Only requests relayed for the gateway count as use. The agent's own health probes, the
``/slots`` reads of its heartbeat and the ``/metrics`` scrapes go to running servers only and
neither start a cold one nor keep one warm.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING

from ..common.errors import NoUpstreamAvailable

if TYPE_CHECKING:
    from .supervisor import ManagedServer, Supervisor

log = logging.getLogger("rolemesh.agent.ondemand")

#: How often idle on-demand servers are looked for, and a load looks again for room.
SWEEP_S = 0.25
_ROOM_POLL_S = 0.05
_READY_POLL_S = 0.1


class LoadStats:
    """Loads and unloads of on-demand roles, for the agent's ``/metrics``."""

    def __init__(self) -> None:
        self.loads: defaultdict[str, int] = defaultdict(int)
        #: Per role: (count, sum) of load durations, start to ``/health`` 200.
        self.load_seconds: defaultdict[str, tuple[int, float]] = defaultdict(lambda: (0, 0.0))
        self.unloads: defaultdict[tuple[str, str], int] = defaultdict(int)
        #: Per role: (count, sum) of first-byte times of requests that waited for a load.
        self.cold_first_byte: defaultdict[str, tuple[int, float]] = defaultdict(lambda: (0, 0.0))

    @staticmethod
    def add(into: defaultdict[str, tuple[int, float]], role: str, seconds: float) -> None:
        n, total = into[role]
        into[role] = (n + 1, total + seconds)


class OnDemand:
    """Loads, idle unloads and the ``max_running`` budget of one agent's on-demand roles."""

    def __init__(self, supervisor: Supervisor, max_running: int | None) -> None:
        self._sup = supervisor
        self.max_running = max_running
        #: Requests in flight per role (the agent counts them; a reload waits on them too).
        self.inflight: dict[str, int] = {}
        #: When each role last finished a request or a load (monotonic seconds).
        self.last_used: dict[str, float] = {}
        self._loads: dict[str, asyncio.Task[str | None]] = {}
        self.stats = LoadStats()

    def used(self, role: str) -> None:
        self.last_used[role] = time.monotonic()

    async def ready(self, role: str, node_id: str) -> float:
        """Wait until ``role``'s server is ready, loading it if needed; returns the seconds waited.

        The caller counts the request in ``inflight`` first, so that nothing stops the server
        between its load and the request. Raises NoUpstreamAvailable (503) with the reason when
        it cannot be loaded.
        """
        backend = self._sup.managed(role)
        if backend.ready:
            return 0.0
        started = time.monotonic()
        task = self._loads.get(role)
        if task is None:
            task = self._sup.owner.start(f"load-{role}", self._load(role, backend))
            self._loads[role] = task
            task.add_done_callback(lambda t: self._forget(role, t))
        # Shielded: a client that gives up does not cancel the load the others wait for.
        problem = await asyncio.shield(task)
        if problem is not None:
            raise NoUpstreamAvailable(f"role '{role}' on node {node_id} could not be loaded: {problem}")
        return time.monotonic() - started

    def _forget(self, role: str, task: asyncio.Task[str | None]) -> None:
        if self._loads.get(role) is task:
            del self._loads[role]

    async def _load(self, role: str, backend: ManagedServer) -> str | None:
        """Make room, start the server, wait for it; None when it is ready, else why not."""
        timeout = backend.load_timeout_s
        if not self._sup.running(role):
            await self._sup.stopped(role)  # an idle stop in progress ends first
            problem = await self._make_room(role, time.monotonic() + timeout)
            if problem is not None:
                log.warning("role %s: not loaded: %s", role, problem)
                return problem
            log.info("role %s: loading %s on demand", role, backend.spec.model)
            self._sup.launch(role)
        started = time.monotonic()
        # The server's own load timeout ends in "restarting"; the slack covers the last probe.
        deadline = started + timeout + 5.0
        while not backend.ready:
            if backend.state == "restarting":  # the load failed: no restart loop for nobody
                problem = backend.detail or "llama-server failed"
                await self._sup.halt(role, f"last load failed: {problem}")
                return problem
            if time.monotonic() >= deadline:
                await self._sup.halt(role, "last load timed out")
                return f"did not load within {timeout:g}s ({backend.load_timeout_key})"
            try:
                async with asyncio.timeout(_READY_POLL_S):
                    await backend.loaded.wait()
            except TimeoutError:
                pass
        seconds = time.monotonic() - started
        self.stats.loads[role] += 1
        LoadStats.add(self.stats.load_seconds, role, seconds)
        self.used(role)
        return None

    async def _make_room(self, role: str, deadline: float) -> str | None:
        """Stop least recently used idle on-demand servers until one more may run."""
        limit = self.max_running
        backend = self._sup.managed(role)
        if limit is None:
            return None
        while True:
            running = self._sup.running_roles()
            if len(running) < limit:
                return None
            idle = [r for r in running if self._idle(r)]
            if idle:
                victim = min(idle, key=lambda r: self.last_used.get(r, 0.0))
                log.info(
                    "role %s: stopping it to make room for %s (max_running: %d; least recently used)",
                    victim,
                    role,
                    limit,
                )
                self.stats.unloads[(victim, "evicted")] += 1
                await self._sup.halt(victim, f"stopped to make room for {role} (max_running)")
                continue
            if time.monotonic() >= deadline:
                return (
                    f"no room within {backend.load_timeout_s:g}s ({backend.load_timeout_key}): "
                    f"max_running is {limit} and every running server has requests in flight or always "
                    f"runs ({', '.join(running)})"
                )
            await asyncio.sleep(_ROOM_POLL_S)

    def _idle(self, role: str) -> bool:
        """May ``role``'s server be stopped now? (on demand, nothing in flight, not loading)"""
        backend = self._sup.backends.get(role)
        return (
            backend is not None
            and backend.on_demand
            and self.inflight.get(role, 0) == 0
            and role not in self._loads
        )

    async def sweep(self) -> None:
        """Stop on-demand servers idle for their ``idle_unload_s`` (runs every :data:`SWEEP_S`)."""
        now = time.monotonic()
        for role in self._sup.running_roles():
            if not self._idle(role):
                continue
            idle_s = self._sup.managed(role).spec.idle_unload_s
            if idle_s is not None and now - self.last_used.get(role, now) >= idle_s:
                log.info("role %s: nothing in flight for %gs (idle_unload_s); stopping it", role, idle_s)
                self.stats.unloads[(role, "idle")] += 1
                await self._sup.halt(role, f"stopped after {idle_s:g}s idle; loads on the next request")
