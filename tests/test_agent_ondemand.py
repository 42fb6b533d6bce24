"""On-demand roles with the stand-in llama-server: one load for many, failed loads, room, idle.

The real llama-server runs the same paths in tests/e2e/test_on_demand.py; here the stand-in
makes loads fail or hang on purpose.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from rolemesh_gateway.agent.config import AgentConfig, parse_config
from rolemesh_gateway.agent.supervisor import Supervisor
from rolemesh_gateway.common.errors import NoUpstreamAvailable
from tests.fakes import write_fake_llama_server
from tests.test_agent_supervisor import run, until


def config(tmp_path: Path, *args: str, max_running: int | None = None, **role: Any) -> AgentConfig:
    binary, model = write_fake_llama_server(tmp_path)
    spec = {"model": str(model), "binary": str(binary), "args": list(args), "start": "on_demand", **role}
    return parse_config(
        {
            "node_id": "n1",
            "gateway_url": "http://127.0.0.1:9",
            "roles": {"a": {"llama_server": spec}, "b": {"llama_server": spec}},
            "supervisor": {"backoff_initial_s": 0.1, "stop_grace_s": 2},
            "probes": {"interval_s": 0.2, "timeout_s": 5},
            "max_running": max_running,
        },
        env={},
    )


def test_nothing_starts_with_the_agent_and_concurrent_requests_share_one_load(tmp_path: Path) -> None:
    async def body(sup: Supervisor) -> None:
        od = sup.on_demand
        await asyncio.sleep(0.3)
        assert sup.running_roles() == [] and sup.cold_roles() == ["a", "b"]
        assert sup.ready_roles() == ["a", "b"]  # registered: they can serve, after a load
        waited = await asyncio.gather(*(od.ready("a", "n1") for _ in range(10)))
        assert all(w > 0 for w in waited)
        assert od.stats.loads == {"a": 1} and sup.running_roles() == ["a"]
        assert sup.cold_roles() == ["b"]
        assert await od.ready("a", "n1") == 0.0  # warm: no wait at all

    run(config(tmp_path, "--load-delay", "0.3"), body)


def test_a_load_that_fails_is_a_503_with_the_reason_and_no_restart_loop(tmp_path: Path) -> None:
    async def body(sup: Supervisor) -> None:
        with pytest.raises(NoUpstreamAvailable, match="role 'a' on node n1 could not be loaded: exited with"):
            await sup.on_demand.ready("a", "n1")
        assert sup.running_roles() == [] and sup.backends["a"].state == "cold"
        assert "last load failed" in sup.backends["a"].detail

    run(config(tmp_path, "--crash", "1"), body)


def test_a_load_that_hangs_gives_up_after_the_roles_load_timeout(tmp_path: Path) -> None:
    async def body(sup: Supervisor) -> None:
        started = time.monotonic()
        with pytest.raises(
            NoUpstreamAvailable, match=r"did not load within 0.5s \(roles.a.llama_server.load_timeout_s\)"
        ):
            await sup.on_demand.ready("a", "n1")
        assert time.monotonic() - started < 5
        assert sup.running_roles() == []

    run(config(tmp_path, "--load-delay", "60", load_timeout_s=0.5), body)


def test_max_running_waits_for_a_busy_server_then_stops_the_least_recently_used(tmp_path: Path) -> None:
    async def body(sup: Supervisor) -> None:
        od = sup.on_demand
        await od.ready("a", "n1")
        od.inflight["a"] = 1  # a request (or stream) in flight on a
        with pytest.raises(NoUpstreamAvailable, match=r"no room within 0.5s .* \(a\)"):
            await od.ready("b", "n1")
        assert sup.running_roles() == ["a"] and sup.backends["a"].ready  # never stopped
        loading = sup.owner.start("test-load-b", od.ready("b", "n1"))
        await asyncio.sleep(0.2)
        assert not loading.done() and sup.backends["a"].ready
        od.inflight["a"] = 0  # the stream ended
        await loading
        assert sup.running_roles() == ["b"] and sup.backends["a"].state == "cold"
        assert od.stats.unloads == {("a", "evicted"): 1}

    run(config(tmp_path, max_running=1, load_timeout_s=0.5), body)


def test_idle_servers_stop_after_idle_unload_s_but_never_with_a_request_in_flight(tmp_path: Path) -> None:
    async def body(sup: Supervisor) -> None:
        od = sup.on_demand
        await asyncio.gather(od.ready("a", "n1"), od.ready("b", "n1"))
        od.inflight["b"] = 1
        await until(lambda: sup.backends["a"].state == "cold", 3, "a stopped when idle")
        assert sup.running_roles() == ["b"]
        od.inflight["b"] = 0
        od.used("b")
        await until(lambda: sup.backends["b"].state == "cold", 3, "b stopped once idle")
        assert od.stats.unloads == {("a", "idle"): 1, ("b", "idle"): 1}
        await od.ready("a", "n1")  # and loads again
        assert od.stats.loads == {"a": 2, "b": 1}

    run(config(tmp_path, idle_unload_s=0.5), body)
