"""The operator's dashboard: one page at ``GET /dashboard`` and the JSON it polls.

The page (``static/dashboard.html``, ``.js``, ``.css``, shipped in the package) holds no data and
no secret: it asks for a key, keeps it in the tab's ``sessionStorage`` and polls
``GET /dashboard/data`` every 2 seconds with ``Authorization: Bearer`` (the key of ``/metrics``:
an admin key when ``auth.admin_api_keys`` is set, else a client key). It is served with a
Content-Security-Policy that allows only the gateway's own origin and no inline script, and its
script writes every value as text, so a node id or an error message that carries markup is shown,
never run. The charts are drawn by hand as small SVGs: a library would add more than the page.

Nothing here is on the request path except :meth:`Dashboard.record_error` (a deque append).
Rates need history, which :class:`~.metrics.Stats` does not keep: :meth:`Dashboard.sample` puts
a :class:`Snapshot` of the counters in a ring (one per :data:`SAMPLE_S` for :data:`HISTORY_S`,
a few hundred bytes per alias each), from a periodic task; without one, the data endpoint takes
the samples itself, and the history has gaps while nobody looks.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import PurePath
from typing import Any, Protocol

from ..common.asgi import Headers, Receive, Scope, Send, send_bytes, send_json
from ..common.errors import NotFound
from ..common.version import __version__
from .guard import Guard
from .metrics import DURATION_BUCKETS, TTFT_BUCKETS, Stats
from .registry import NodeRegistry
from .routes import Route

#: One snapshot of the counters every this many seconds, kept this long.
SAMPLE_S = 2.0
HISTORY_S = 600.0
#: Rates are over the last RATE_WINDOW_S; error ratio and latency quantiles over STATS_WINDOW_S.
RATE_WINDOW_S = 10.0
STATS_WINDOW_S = 60.0
#: Recent errors kept, and how much of each message.
MAX_ERRORS = 50
MAX_MESSAGE = 300

STATIC_PREFIX = "/dashboard/static/"
#: Only this origin, no inline script or style, no forms posting anywhere, not framed.
CSP = (
    b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
}
_COMMON: Headers = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]


class Source(Protocol):
    """What the dashboard reads (the gateway), looked up on every call: a reload may swap them."""

    @property
    def stats(self) -> Stats: ...
    @property
    def registry(self) -> NodeRegistry: ...
    @property
    def routes(self) -> Mapping[str, Route]: ...
    @property
    def guard(self) -> Guard: ...


@dataclass(slots=True)
class Counts:
    """An alias's counters at one moment: requests, 5xx answers, completion tokens."""

    requests: int = 0
    errors: int = 0
    tokens: int = 0


#: One interval's requests/s, 5xx answers/s and completion tokens/s.
Rates = tuple[float | None, float | None, float | None]
NO_TRAFFIC: Rates = (0.0, 0.0, 0.0)


@dataclass(slots=True)
class Snapshot:
    """The counters at time ``t``, per alias (``unknown`` included) and in all; histograms summed
    over endpoints. ``rates`` (per alias) and ``total_rates`` are over the :data:`RATE_WINDOW_S`
    before it (as the current rates are: a calmer line than 2-second steps), worked out once
    when it joins the history."""

    t: float
    counts: dict[str, Counts] = field(default_factory=dict)
    total: Counts = field(default_factory=Counts)
    durations: dict[str, list[int]] = field(default_factory=dict)
    ttft: dict[str, list[int]] = field(default_factory=dict)
    rates: dict[str, Rates] = field(default_factory=dict)
    total_rates: Rates = NO_TRAFFIC

    @classmethod
    def of(cls, stats: Stats, t: float) -> Snapshot:
        snap = cls(t)
        counts = snap.counts
        for (alias, _, status), n in stats.requests.items():
            c = counts.get(alias) or counts.setdefault(alias, Counts())
            c.requests += n
            if status >= 500:
                c.errors += n
        for (alias, _, kind), n in stats.tokens.items():
            if kind == "completion":
                (counts.get(alias) or counts.setdefault(alias, Counts())).tokens += n
        for (alias, _), hist in stats.durations.items():
            _add(snap.durations, alias, hist.counts)
        for alias, hist in stats.ttft.items():
            _add(snap.ttft, alias, hist.counts)
        total = snap.total
        for c in counts.values():
            total.requests += c.requests
            total.errors += c.errors
            total.tokens += c.tokens
        return snap

    def since(self, old: Snapshot) -> None:
        """Work out ``rates`` and ``total_rates`` since ``old``."""
        dt = self.t - old.t
        for alias, c in self.counts.items():
            self.rates[alias] = _rates(c, old.counts.get(alias) or Counts(), dt)
        self.total_rates = _rates(self.total, old.total, dt)


def _rates(new: Counts, old: Counts, dt: float) -> Rates:
    return (
        _rate(new.requests, old.requests, dt),
        _rate(new.errors, old.errors, dt),
        _rate(new.tokens, old.tokens, dt),
    )


def _add(into: dict[str, list[int]], alias: str, counts: list[int]) -> None:
    have = into.get(alias)
    if have is None:
        into[alias] = list(counts)
    else:
        into[alias] = [a + b for a, b in zip(have, counts, strict=True)]


def quantile(bounds: tuple[float, ...], counts: list[int], q: float) -> float | None:
    """The ``q`` quantile of bucket counts, interpolated inside its bucket as Prometheus'
    ``histogram_quantile`` does (so the dashboard and a Grafana panel agree); None when empty."""
    total = sum(counts)
    if not total:
        return None
    rank, seen = q * total, 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i == len(bounds):  # the +Inf bucket: its lower bound is all that is known
                return bounds[-1]
            lower = bounds[i - 1] if i else 0.0
            return lower + (bounds[i] - lower) * (rank - seen) / n
        seen += n
    return bounds[-1]


def _diff(new: list[int] | None, old: list[int] | None) -> list[int]:
    if new is None:
        return []
    if old is None:
        return new
    return [max(0, a - b) for a, b in zip(new, old, strict=True)]


def _rate(new: int, old: int, dt: float) -> float | None:
    return round(max(0, new - old) / dt, 3) if dt > 0 else None


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


class Dashboard:
    """Serves the page and its data, keeps the counters' history and the recent errors."""

    def __init__(
        self, source: Source, clock: Callable[[], float] = time.time, sample_s: float = SAMPLE_S
    ) -> None:
        self._source = source
        self._clock = clock
        self.sample_s = sample_s
        self._ring: collections.deque[Snapshot] = collections.deque(maxlen=int(HISTORY_S / sample_s) + 1)
        self._ring.append(Snapshot.of(source.stats, clock()))  # the baseline: rates from the start
        self._errors: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_ERRORS)
        self._started = clock()
        root = resources.files("rolemesh_gateway.gateway").joinpath("static")
        self._files = {
            f.name: f.read_bytes()
            for f in root.iterdir()
            if f.is_file() and PurePath(f.name).suffix in _TYPES
        }

    # -- what the gateway calls -----------------------------------------------------------
    def record_error(self, request_id: str, alias: str, node: str | None, status: int, message: str) -> None:
        """Remember an error answer (the last :data:`MAX_ERRORS` are shown)."""
        self._errors.append(
            {
                "time": round(self._clock(), 3),
                "request_id": request_id,
                "alias": alias,
                "node": node,
                "status": status,
                "message": message[:MAX_MESSAGE],
            }
        )

    async def sample(self) -> None:
        """Add a snapshot to the history (the periodic task; skipped if one was just taken)."""
        self._sample(self._clock(), self.sample_s / 2)

    def _sample(self, now: float, min_gap_s: float) -> None:
        if now - self._ring[-1].t >= min_gap_s:
            snap = Snapshot.of(self._source.stats, now)
            snap.since(self._base(now - RATE_WINDOW_S))
            self._ring.append(snap)

    def _base(self, t: float) -> Snapshot:
        """The newest snapshot taken at or before ``t`` (the oldest one if none is that old)."""
        for snap in reversed(self._ring):
            if snap.t <= t:
                return snap
        return self._ring[0]

    # -- the endpoints --------------------------------------------------------------------
    async def page(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``GET /dashboard``: the page; public, it holds no data."""
        await self._file(send, "dashboard.html")

    async def static(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``GET /dashboard/static/<name>``: the page's script, style and icon (a fixed list)."""
        name = scope["path"][len(STATIC_PREFIX) :]
        if name not in self._files or name.endswith(".html"):
            raise NotFound(f"no such dashboard file: {name}")
        await self._file(send, name)

    async def _file(self, send: Send, name: str) -> None:
        headers = [
            (b"content-type", _TYPES[PurePath(name).suffix]),
            (b"cache-control", b"no-cache"),
            (b"content-security-policy", CSP),
            *_COMMON,
        ]
        await send_bytes(send, 200, self._files[name], headers)

    async def data(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``GET /dashboard/data``: :meth:`report` as JSON (the key of ``/metrics``)."""
        self._source.guard.admin(scope["headers"])
        await send_json(send, 200, self.report(), [(b"cache-control", b"no-store"), *_COMMON])

    def report(self) -> dict[str, Any]:
        """Everything the page shows, in one object::

            {"time": 1767225600.5,               # the gateway's clock (Unix seconds)
             "version": "0.1.0", "uptime_s": 3600.0, "stale_after_s": 30.0,
             "windows": {"rate_s": 10, "stats_s": 60, "sample_s": 2, "history_s": 600},
             "totals": {"requests": 1200, "requests_per_s": 3.2, "error_ratio": 0.01,
                        "completion_tokens_per_s": 410.5, "inflight": 4, "queue_waiting": 0,
                        "nodes": {"fresh": 2, "stale": 0, "ejected": 0, "draining": 1}},
             "aliases": [{"alias": "writer", "type": "discovered", "role": "writer",
                          "strategy": "least_busy", "upstream": null,
                          "nodes": {"fresh": 2, "stale": 0, "ejected": 0, "draining": 1},
                          "available": true,
                          "reason": null, "requests": 800, "requests_per_s": 2.1,
                          "error_ratio": 0.0, "latency_p50_s": 0.81, "latency_p95_s": 2.3,
                          "ttft_p50_s": 0.12, "completion_tokens_per_s": 300.0, "inflight": 3,
                          "queue_waiting": 0, "queue_rejected": 0}],
             "nodes": [{"node_id": "gpu-1", "base_url": "http://10.0.0.12:8091",
                        "roles": ["writer"], "state": "fresh", "seconds_since_heartbeat": 1.2,
                        "inflight": 2, "slots_busy": 2, "slots_total": 4, "version": "0.1.0"}],
             "history": {"t": [1767225000.5, ...],   # one point per sample_s, for history_s
                         "total": {"requests_per_s": [...], "errors_per_s": [...],
                                   "completion_tokens_per_s": [...]},
                         "aliases": {"writer": {...the same three series...}}},
             "errors": [{"time": 1767225590.1, "request_id": "9f2c-1a", "alias": "writer",
                         "node": "gpu-1", "status": 502, "message": "node gpu-1 ... HTTP 503"}]}

        ``requests`` counts since start; ``*_per_s`` over the last ``rate_s`` (in ``history`` too,
        over the ``rate_s`` before each point); ``error_ratio`` (5xx
        answers / all answers), latency and time-to-first-token quantiles over the last
        ``stats_s`` (null without traffic). Node ``state`` is ``fresh``, ``stale``, ``ejected`` or
        ``draining``. ``errors`` are newest first.
        """
        src = self._source
        now = self._clock()
        self._sample(now, self.sample_s)  # no periodic task (or it fell behind): sample here
        live = Snapshot.of(src.stats, now)
        rate_base = self._base(now - RATE_WINDOW_S)
        stats_base = self._base(now - STATS_WINDOW_S)
        dt = now - rate_base.t
        nodes, states = self._nodes()
        by_role: dict[str, dict[str, int]] = {}
        for n in nodes:
            for role in n["roles"]:
                counts = by_role.setdefault(role, dict.fromkeys(states, 0))
                counts[n["state"]] += 1
        aliases = []
        queues: dict[int, int] = {}  # a role's queue is shared by its aliases: count it once
        for alias, route in src.routes.items():
            ok, reason = route.available()
            queue = getattr(route, "queue", None)
            if queue is not None:
                queues[id(queue)] = len(queue)
            c, r, s = (x.counts.get(alias) or Counts() for x in (live, rate_base, stats_base))
            role = getattr(route, "role", None)
            recent = c.requests - s.requests
            aliases.append(
                {
                    "alias": alias,
                    "type": route.kind,
                    "role": role,
                    "strategy": getattr(route, "strategy_name", None),
                    "upstream": getattr(route, "url", None),
                    "nodes": None if role is None else by_role.get(role, dict.fromkeys(states, 0)),
                    "available": ok,
                    "reason": None if ok else reason,
                    "requests": c.requests,
                    "requests_per_s": _rate(c.requests, r.requests, dt),
                    "error_ratio": _round((c.errors - s.errors) / recent) if recent > 0 else None,
                    "latency_p50_s": _round(self._quantile(live, stats_base, alias, 0.5)),
                    "latency_p95_s": _round(self._quantile(live, stats_base, alias, 0.95)),
                    "ttft_p50_s": _round(
                        quantile(TTFT_BUCKETS, _diff(live.ttft.get(alias), stats_base.ttft.get(alias)), 0.5)
                    ),
                    "completion_tokens_per_s": _rate(c.tokens, r.tokens, dt),
                    "inflight": src.stats.inflight.get(alias, 0),
                    "queue_waiting": len(queue) if queue is not None else 0,
                    "queue_rejected": sum(k for (a, _), k in src.stats.queue_rejected.items() if a == alias),
                }
            )
        total, total_base, total_stats = live.total, rate_base.total, stats_base.total
        recent = total.requests - total_stats.requests
        return {
            "time": round(now, 3),
            "version": __version__,
            "uptime_s": round(now - self._started, 1),
            "stale_after_s": src.registry.stale_after_s,
            "windows": {
                "rate_s": RATE_WINDOW_S,
                "stats_s": STATS_WINDOW_S,
                "sample_s": self.sample_s,
                "history_s": HISTORY_S,
            },
            "totals": {
                "requests": total.requests,
                "requests_per_s": _rate(total.requests, total_base.requests, dt),
                "error_ratio": _round((total.errors - total_stats.errors) / recent) if recent > 0 else None,
                "completion_tokens_per_s": _rate(total.tokens, total_base.tokens, dt),
                "inflight": sum(src.stats.inflight.values()),
                "queue_waiting": sum(queues.values()),
                "nodes": states,
            },
            "aliases": aliases,
            "nodes": nodes,
            "history": self._history(list(src.routes)),
            "errors": list(reversed(self._errors)),
        }

    @staticmethod
    def _quantile(live: Snapshot, base: Snapshot, alias: str, q: float) -> float | None:
        return quantile(DURATION_BUCKETS, _diff(live.durations.get(alias), base.durations.get(alias)), q)

    def _nodes(self) -> tuple[list[dict[str, Any]], dict[str, int]]:
        registry = self._source.registry
        now = registry.clock()
        states = dict.fromkeys(("fresh", "stale", "ejected", "draining"), 0)
        nodes = []
        for n in sorted(registry.all_nodes(), key=lambda n: n.node_id):
            state: str = registry.state(n, now)
            if state == "fresh" and getattr(n, "draining", False):  # stale, then ejected, say more
                state = "draining"
            states[state] = states.get(state, 0) + 1
            nodes.append(
                {
                    "node_id": n.node_id,
                    "base_url": n.base_url,
                    "roles": list(n.roles),
                    "state": state,
                    "seconds_since_heartbeat": round(max(0.0, now - n.last_seen), 1),
                    "inflight": n.inflight,
                    "slots_busy": n.slots_busy,
                    "slots_total": n.slots_total,
                    "version": n.version,
                }
            )
        return nodes, states

    def _history(self, aliases: list[str]) -> dict[str, Any]:
        """Per sample: requests/s, 5xx answers/s, completion tokens/s over the window before it."""
        snaps = list(self._ring)[1:]  # the first is the baseline, or its window began before the history
        return {
            "t": [round(s.t, 1) for s in snaps],
            "total": _series([s.total_rates for s in snaps]),
            "aliases": {a: _series([s.rates.get(a, NO_TRAFFIC) for s in snaps]) for a in aliases},
        }


def _series(rates: list[Rates]) -> dict[str, list[float | None]]:
    return {
        "requests_per_s": [r[0] for r in rates],
        "errors_per_s": [r[1] for r in rates],
        "completion_tokens_per_s": [r[2] for r in rates],
    }
