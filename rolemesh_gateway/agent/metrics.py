"""The node agent's ``GET /metrics``: its own series, and those of its llama-servers.

One scrape per host sees everything: the agent's own counters (backends up, restarts,
requests by status), and the ``llamacpp:*`` series of every llama-server it runs (started with
``--metrics``), each sample with a ``role`` label added. The llama-servers are asked at scrape
time, in parallel, with a short timeout; one that does not answer is left out of that scrape.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from ..common.errors import RoleMeshError
from ..common.http1 import Client

if TYPE_CHECKING:
    from .ondemand import LoadStats
    from .supervisor import Supervisor

SCRAPE_TIMEOUT_S = 2.0


class AgentStats:
    """Requests the agent relayed, by role and status."""

    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, int], int] = defaultdict(int)


async def exposition(supervisor: Supervisor, stats: AgentStats, client: Client) -> bytes:
    """Everything, in the Prometheus text format."""
    backends = supervisor.ready_backends()
    texts = await asyncio.gather(*(_scrape(client, b.url, b.auth) for b in backends.values() if b.url))
    upstream = dict(zip([r for r, b in backends.items() if b.url], texts, strict=True))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(supervisor, stats, upstream))
    return generate_latest(registry)


async def _scrape(client: Client, url: str | None, auth: list[tuple[bytes, bytes]]) -> str | None:
    try:
        status, body = await client.request(
            "GET", f"{url}/metrics", auth, b"", SCRAPE_TIMEOUT_S, f"{url}/metrics"
        )
    except RoleMeshError:
        return None
    return body.decode("utf-8", "replace") if status == 200 else None


class _Collector:
    def __init__(self, supervisor: Supervisor, stats: AgentStats, upstream: dict[str, str | None]) -> None:
        self._supervisor = supervisor
        self._stats = stats
        self._upstream = upstream

    def collect(self) -> Iterator[Metric]:
        backends = self._supervisor.backends
        up = GaugeMetricFamily(
            "rolemesh_agent_backend_up", "1 while the role's server can serve.", labels=("role",)
        )
        restarts = CounterMetricFamily(
            "rolemesh_agent_restarts", "Times the role's llama-server was restarted.", labels=("role",)
        )
        for role, backend in sorted(backends.items()):
            up.add_metric([role], 1.0 if backend.ready else 0.0)
            restarts.add_metric([role], float(getattr(backend, "restarts", 0)))
        yield up
        yield restarts
        requests = CounterMetricFamily(
            "rolemesh_agent_requests", "Requests relayed to a role, by status.", labels=("role", "status")
        )
        for (role, status), n in sorted(self._stats.requests.items()):
            requests.add_metric([role, str(status)], float(n))
        yield requests
        yield from _on_demand(self._supervisor.on_demand.stats)
        yield from _with_role(self._upstream)


def _on_demand(stats: LoadStats) -> Iterator[Metric]:
    """Loads and unloads of on-demand roles (``start: on_demand``)."""
    loads = CounterMetricFamily(
        "rolemesh_agent_model_loads", "On-demand starts of a role's llama-server.", labels=("role",)
    )
    for role, n in sorted(stats.loads.items()):
        loads.add_metric([role], float(n))
    yield loads
    seconds = SummaryMetricFamily(
        "rolemesh_agent_model_load_seconds",
        "Time an on-demand llama-server took from start to /health 200.",
        labels=("role",),
    )
    for role, (n, total) in sorted(stats.load_seconds.items()):
        seconds.add_metric([role], n, total)
    yield seconds
    unloads = CounterMetricFamily(
        "rolemesh_agent_model_unloads",
        "On-demand llama-servers stopped, by reason (idle: idle_unload_s; evicted: max_running).",
        labels=("role", "reason"),
    )
    for (role, reason), n in sorted(stats.unloads.items()):
        unloads.add_metric([role, reason], float(n))
    yield unloads
    first = SummaryMetricFamily(
        "rolemesh_agent_cold_start_first_byte_seconds",
        "Requests that waited for a model to load: time from arrival to the first byte of the answer.",
        labels=("role",),
    )
    for role, (n, total) in sorted(stats.cold_first_byte.items()):
        first.add_metric([role], n, total)
    yield first


def _with_role(upstream: dict[str, str | None]) -> Iterator[Metric]:
    """The servers' own families, merged by name, each sample labelled with its role."""
    merged: dict[str, Metric] = {}
    for role, text in sorted(upstream.items()):
        if not text:
            continue
        try:
            families = list(text_string_to_metric_families(text))
        except ValueError:  # not the exposition format: nothing to add from this one
            continue
        for family in families:
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type)
            for sample in family.samples:
                into.samples.append(
                    Sample(sample.name, {**sample.labels, "role": role}, sample.value, sample.timestamp)
                )
    yield from merged.values()
