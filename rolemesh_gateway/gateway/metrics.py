"""What the gateway counts, and its Prometheus exposition (``GET /metrics``).

Metrics are always on, so they sit on the hot path: a request only adds to plain ``int``s and
bucket counts in dicts (no locks, no label objects), and :class:`Collector` turns them into
metric families when Prometheus scrapes, through ``prometheus_client`` (its exposition format,
not ours). Node states, slots and queue lengths are read at scrape time from the registry and
the routes, so they cost nothing per request.

Label values are bounded: ``alias`` is a configured alias or ``unknown`` (a flood of random
``model`` names adds no series), ``endpoint`` one of the routed paths, ``client`` a key's
*name* (never the key), ``node`` a registered node id, ``status`` an HTTP status.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

if TYPE_CHECKING:
    from .registry import NodeRegistry
    from .routes import Route

UNKNOWN = "unknown"
#: Seconds; what a chat completion takes spans milliseconds to minutes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
OUTCOMES = ("ok", "connect_error", "timeout", "http_error", "broken")


class Histogram:
    """Bucket counts and a sum: what a Prometheus histogram needs, at a bisect per observation."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative ``(le, count)`` pairs, ending with ``+Inf``."""
        out, total = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        return out

    def quantile(self, q: float) -> float | None:
        """An estimate of the ``q`` quantile (the upper bound of its bucket); None when empty."""
        total = sum(self.counts)
        if not total:
            return None
        rank, seen = q * total, 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            seen += count
            if seen >= rank:
                return bound if bound != float("inf") else self.bounds[-1]
        return self.bounds[-1]


class Stats:
    """The gateway's counters, added to on the request path."""

    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, str, int], int] = defaultdict(int)
        self.durations: dict[tuple[str, str], Histogram] = {}
        self.ttft: dict[str, Histogram] = {}
        self.attempts: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.inflight: defaultdict[str, int] = defaultdict(int)
        self.queue_rejected: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.tokens: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.client_requests: defaultdict[tuple[str, str, int], int] = defaultdict(int)
        #: Requests another alias served (``fallbacks``), by from, to and reason.
        self.fallbacks: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        #: Requests refused by a client key's own limits or model access, by key name and reason.
        self.client_rejected: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.prompt_cache_tokens: defaultdict[tuple[str, str], int] = defaultdict(int)
        #: cache_aware: why each request went where it did (prefix, session, balance, least_loaded).
        self.cache_decisions: defaultdict[tuple[str, str], int] = defaultdict(int)

    def finished(
        self,
        alias: str,
        endpoint: str,
        status: int,
        seconds: float,
        client: str,
        ttft: float | None,
        usage: tuple[int, int] | None,
    ) -> None:
        """One answered request (every routed request, whatever its outcome)."""
        self.requests[(alias, endpoint, status)] += 1
        self.client_requests[(client, alias, status)] += 1
        key = (alias, endpoint)
        hist = self.durations.get(key)
        if hist is None:
            hist = self.durations[key] = Histogram(DURATION_BUCKETS)
        hist.observe(seconds)
        if ttft is not None:
            t = self.ttft.get(alias)
            if t is None:
                t = self.ttft[alias] = Histogram(TTFT_BUCKETS)
            t.observe(ttft)
        if usage is not None:
            self.tokens[(alias, client, "prompt")] += usage[0]
            self.tokens[(alias, client, "completion")] += usage[1]

    def prompt_cache(self, alias: str, cache: tuple[int, int]) -> None:
        """Prompt tokens a server took from its cache and those it processed, for one answer."""
        self.prompt_cache_tokens[(alias, "cached")] += cache[0]
        self.prompt_cache_tokens[(alias, "processed")] += cache[1]


class Collector:
    """Turns :class:`Stats` (and the registry's and routes' state) into metric families."""

    def __init__(self, stats: Stats, registry: NodeRegistry, routes: Mapping[str, Route]) -> None:
        self._stats = stats
        self._registry = registry
        self._routes = routes

    def collect(self) -> Iterator[Metric]:
        s = self._stats
        yield _counter(
            "rolemesh_requests",
            "Requests answered, by HTTP status sent to the client.",
            ("alias", "endpoint", "status"),
            s.requests,
        )
        durations = HistogramMetricFamily(
            "rolemesh_request_duration_seconds",
            "Time from a request's arrival to the end of its answer.",
            labels=("alias", "endpoint"),
        )
        for (alias, endpoint), hist in sorted(s.durations.items()):
            durations.add_metric([alias, endpoint], hist.buckets(), hist.sum)
        yield durations
        ttft = HistogramMetricFamily(
            "rolemesh_time_to_first_token_seconds",
            "Streamed answers: time from a request's arrival to the first event that carries content.",
            labels=("alias",),
        )
        for alias, hist in sorted(s.ttft.items()):
            ttft.add_metric([alias], hist.buckets(), hist.sum)
        yield ttft
        yield _counter(
            "rolemesh_upstream_attempts",
            "Attempts to serve a request on an upstream or node, by outcome.",
            ("alias", "node", "outcome"),
            s.attempts,
        )
        yield _gauge(
            "rolemesh_inflight_requests",
            "Requests in flight.",
            ("alias",),
            {(a,): n for a, n in s.inflight.items()},
        )
        waiting = {
            (alias,): len(queue)
            for alias, route in self._routes.items()
            if (queue := getattr(route, "queue", None)) is not None
        }
        yield _gauge(
            "rolemesh_queue_waiting", "Requests waiting for a free slot (least_busy).", ("alias",), waiting
        )
        yield _counter(
            "rolemesh_queue_rejected",
            "Requests refused by the wait queue, by reason (full, timeout).",
            ("alias", "reason"),
            s.queue_rejected,
        )
        yield from self._nodes()
        yield _counter(
            "rolemesh_tokens",
            "Tokens from the usage the upstream reported, by client key name.",
            ("alias", "client", "kind"),
            s.tokens,
        )
        yield _counter(
            "rolemesh_prompt_cache_tokens",
            "Prompt tokens the upstream took from its prompt cache (cached) or processed, from its usage.",
            ("alias", "kind"),
            s.prompt_cache_tokens,
        )
        yield _counter(
            "rolemesh_cache_aware_decisions",
            "cache_aware: requests routed by prefix match, session, load balance or least load.",
            ("alias", "reason"),
            s.cache_decisions,
        )
        yield _counter(
            "rolemesh_client_requests",
            "Requests answered, by client key name.",
            ("client", "alias", "status"),
            s.client_requests,
        )
        yield _counter(
            "rolemesh_fallbacks",
            "Requests passed on to a fallback alias, by reason (no_upstream, queue_full, queue_timeout, "
            "upstream_failed, unavailable, context_too_long).",
            ("from", "to", "reason"),
            s.fallbacks,
        )
        yield _counter(
            "rolemesh_client_rejected",
            "Requests refused by a client key's limits or model access, by key name and reason "
            "(requests_per_minute, tokens_per_minute, max_concurrent, models).",
            ("client", "reason"),
            s.client_rejected,
        )

    def _nodes(self) -> Iterator[Metric]:
        registry = self._registry
        now = registry.clock()
        states: defaultdict[tuple[str, str], int] = defaultdict(int)
        slots: dict[tuple[str, str], int] = {}
        for node in registry.all_nodes():
            state = registry.state(node, now)
            for role in node.roles:
                states[(role, state)] += 1
            if node.slots_total is not None:
                slots[(node.node_id, "total")] = node.slots_total
            if node.slots_busy is not None:
                slots[(node.node_id, "busy")] = node.slots_busy
        roles: set[str] = {r for route in self._routes.values() if (r := getattr(route, "role", None))}
        for r in roles:  # every configured role shows all its states, zeros included
            for st in ("fresh", "stale", "ejected", "draining"):
                states.setdefault((r, st), 0)
        yield _gauge(
            "rolemesh_nodes",
            "Registered nodes by role and state (fresh, stale, ejected, draining).",
            ("role", "state"),
            states,
        )
        yield _gauge(
            "rolemesh_node_slots", "Slots a node reported in its last heartbeat.", ("node", "kind"), slots
        )


def _counter(name: str, doc: str, labels: tuple[str, ...], values: Mapping[Any, int]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric([str(v) for v in key], value)
    return family


def _gauge(name: str, doc: str, labels: tuple[str, ...], values: Mapping[Any, int]) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric([str(v) for v in key], value)
    return family


def exposition(collector: Collector) -> bytes:
    """The Prometheus text format of everything the collector reports."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)
