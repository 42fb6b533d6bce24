"""The gateway's ASGI application: dispatch and lifespan, nothing else.

Deliberately a plain ASGI callable rather than a framework: the inference path is a dict
lookup, a header scan and a JSON parse before the request goes upstream. The endpoints live in
:mod:`.inference`, :mod:`.api_status` and :mod:`.api_nodes`; routes in :mod:`.routes`.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from prometheus_client import CONTENT_TYPE_LATEST

from ..common.asgi import Dispatcher, Message, Receive, Scope, Send, header, lifespan, send_bytes, send_error
from ..common.endpoints import ANTHROPIC_PATHS, ROUTED
from ..common.errors import ConfigError, RoleMeshError
from ..common.http1 import Client
from ..common.logs import RequestLog, current_request
from ..common.tasks import TaskOwner, on_signal
from ..common.tls import client_context, reload_tls, server_context
from ..common.version import __version__
from .api_nodes import NODES_PREFIX, NodesAPI
from .api_status import MODELS_PREFIX, StatusAPI
from .cors import Cors
from .dashboard import SAMPLE_S, STATIC_PREFIX, Dashboard
from .guard import Guard
from .health import HealthMonitor
from .inference import EndpointHandler, Inference
from .limits import ClientLimits
from .metrics import Collector, Stats, exposition
from .node_policy import NodePolicy
from .registry import NodeRegistry, make_registry
from .routes import build_routes
from .settings import Settings, load_settings

log = logging.getLogger("rolemesh.gateway")


class Gateway:
    """The RoleMesh gateway as an ASGI app.

    ``registry`` and ``client`` are seams for tests (a registry with a fake clock, a client that
    answers from a script); by default they are built from the settings.
    """

    def __init__(
        self,
        settings: Settings,
        registry: NodeRegistry | None = None,
        client: Client | None = None,
        access_log: bool = False,
        config_path: str | None = None,
    ) -> None:
        self.stats = Stats()
        self.client = client or Client(keepalive_s=30.0)
        self.registry = registry or make_registry(settings)
        self.tasks = TaskOwner()
        #: The file SIGHUP reloads (None: built from a dict, nothing to reload).
        self.config_path = config_path
        self._access_log = access_log
        self.health: HealthMonitor | None = None
        self.dashboard = Dashboard(self)  # once: its history and recent errors outlive a reload
        #: The context the server listens with (None: plain HTTP); a reload loads new files into it.
        self.server_ssl = server_context(settings.tls)
        #: Per-client counts (once: a reload keeps them; Redis counts them with a shared registry).
        self.limits = ClientLimits(self.stats, self.registry, settings.registry.key_prefix)
        self._apply(settings)

    def _apply(self, settings: Settings) -> None:
        """Build everything that follows from the settings, then switch to it in one step.

        Requests already running keep the objects they started with (routes, keys, timeouts)
        and finish undisturbed; the registry, the connection pool and the counters stay.
        """
        guard = Guard(settings.auth)
        self.client.ssl_context = client_context(settings.tls)
        health = HealthMonitor(settings, self.client, previous=self.health)
        policy = NodePolicy(settings.nodes.allowed_networks)
        routes = build_routes(
            settings, self.client, self.registry, health, guard.nodes, policy.allows, self.stats
        )
        inference = Inference(
            settings,
            routes,
            guard,
            self.stats,
            self._access_log,
            on_error=self.dashboard.record_error,
            limits=self.limits,
        )
        status = StatusAPI(settings, routes, guard, inference)
        nodes = NodesAPI(settings, self.registry, guard, policy)
        d = Dispatcher()
        for endpoint in ROUTED:
            d.add(endpoint.method, endpoint.path, inference.handler(endpoint))
        d.add("GET", "/health", status.health)
        d.add("GET", "/ready", status.ready)
        d.add("GET", "/v1/models", status.models)
        d.add("GET", "/models", status.models)
        d.add_prefix("GET", MODELS_PREFIX, status.model)
        d.add("GET", "/v1/nodes", nodes.list)
        d.add("POST", "/v1/nodes/register", nodes.register)
        d.add("POST", "/v1/nodes/heartbeat", nodes.heartbeat)
        d.add_prefix("DELETE", NODES_PREFIX, nodes.deregister)
        d.add_prefix("POST", NODES_PREFIX, nodes.drain)
        d.add("GET", "/metrics", self.metrics)
        d.add("GET", "/dashboard", self.dashboard.page)
        d.add("GET", "/dashboard/data", self.dashboard.data)
        d.add_prefix("GET", STATIC_PREFIX, self.dashboard.static)
        # The switch: plain assignments on the one event loop, so no request sees half of it.
        self.settings, self.guard, self.health, self.routes = settings, guard, health, routes
        self.inference, self._dispatch = inference, d
        self._cors = Cors(settings.cors) if settings.cors.allow_origins else None
        self.collector = Collector(self.stats, self.registry, routes)
        self.registry.stale_after_s = settings.nodes.stale_after_s
        self.registry.evict_after_s = settings.nodes.evict_after_s
        self.registry.max_nodes = settings.nodes.max_nodes
        self.registry.max_nodes_per_key = settings.nodes.max_nodes_per_key

    def reload(self) -> bool:
        """Read the config file again (SIGHUP); switch to it if it is valid, else keep serving.

        A bad file is refused with one log line saying why. The ``registry`` section needs a
        restart (the nodes live there); everything else changes for the next request.
        """
        if self.config_path is None:
            log.warning("reload asked, but this gateway was not started from a config file")
            return False
        try:
            settings = load_settings(self.config_path)
        except ConfigError as exc:
            log.error("config reload refused, still serving the previous config: %s", exc)
            return False
        if settings.registry != self.settings.registry:
            log.error(
                "config reload refused, still serving the previous config: %s: registry: "
                "changing the node registry needs a restart",
                self.config_path,
            )
            return False
        problem = reload_tls(self.server_ssl, settings.tls)
        if problem is not None:
            log.error(
                "config reload refused, still serving the previous config: %s: %s", self.config_path, problem
            )
            return False
        before = set(self.routes)
        self._apply(settings)
        added, removed = sorted(set(self.routes) - before), sorted(before - set(self.routes))
        log.info(
            "config reloaded from %s: %d aliases (%s)%s%s",
            self.config_path,
            len(self.routes),
            ", ".join(self.routes),
            f"; added {', '.join(added)}" if added else "",
            f"; removed {', '.join(removed)}" if removed else "",
        )
        self.tasks.start("probe-after-reload", self._probe())
        return True

    async def _probe(self) -> None:
        assert self.health is not None
        await self.health.probe_all()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # Every answer, errors included, carries the request id; every log line about the
            # request too (through the context variable).
            rid = self.inference.request_id(scope["headers"])
            scope["rolemesh.request_id"] = rid
            current_request.set(RequestLog(rid.decode("ascii")))
            if self._cors is not None:
                origin = header(scope["headers"], b"origin")
                if origin is not None and self._cors.allowed(origin):
                    if scope["method"] == "OPTIONS":
                        await self._cors.preflight(scope, _with_request_id(send, rid), origin)
                        return
                    send = self._cors.wrap(send, origin)
            try:
                handler = self._dispatch.find(scope["method"], scope["path"])
                # The routed endpoints add the id themselves (one wrapper on the hot path, not two).
                await handler(
                    scope, receive, send if type(handler) is EndpointHandler else _with_request_id(send, rid)
                )
            except RoleMeshError as exc:
                anthropic = scope["path"] in ANTHROPIC_PATHS
                await send_error(send, exc, [(b"x-request-id", rid)], anthropic=anthropic)
        elif scope["type"] == "lifespan":
            await lifespan(receive, send, self.startup, self.shutdown)

    async def metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``GET /metrics``: the Prometheus exposition (an admin key, or a client key without any)."""
        self.guard.admin(scope["headers"])
        await send_bytes(
            send, 200, exposition(self.collector), [(b"content-type", CONTENT_TYPE_LATEST.encode())]
        )

    async def startup(self) -> None:
        """Probe once (so the first answers are right), then start the background loops."""
        if self.guard.open:
            log.warning(
                "NO API KEYS CONFIGURED: anyone who can reach this gateway can use it "
                "and register nodes. Set auth.client_api_keys and auth.node_api_keys."
            )
        await self.registry.start()
        p = self.settings.probes
        try:
            async with asyncio.timeout(p.timeout_s + 0.5):
                await self._probe()
        except TimeoutError:
            pass
        self.tasks.every("probe-upstreams", p.interval_s, self._probe)
        self.tasks.every("sample-dashboard", SAMPLE_S, self.dashboard.sample)
        on_signal(signal.SIGHUP, self.reload)
        sweep_every = min(60.0, self.settings.nodes.evict_after_s / 4)
        self.tasks.every("evict-stale-nodes", sweep_every, self.registry.sweep)
        self.tasks.every("close-idle-upstream-connections", 10.0, self.client.sweep)
        if self.registry.sync_interval_s is not None:
            self.tasks.every("sync-shared-registry", self.registry.sync_interval_s, self.registry.sync)
        log.info(
            "RoleMesh gateway %s ready: %d aliases (%s)",
            __version__,
            len(self.routes),
            ", ".join(self.routes),
        )

    async def shutdown(self) -> None:
        """Stop the loops (reverse order), then the registry, then the connection pool."""
        on_signal(signal.SIGHUP, None)
        await self.tasks.stop()
        await self.registry.close()
        await self.client.close()


def _with_request_id(send: Send, rid: bytes) -> Send:
    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message["headers"], (b"x-request-id", rid)]
        await send(message)

    return send_with_id


def create_app(
    settings: Settings,
    registry: NodeRegistry | None = None,
    client: Client | None = None,
    access_log: bool = False,
    config_path: str | None = None,
) -> Gateway:
    """Build the gateway ASGI app from validated settings (``config_path``: what SIGHUP reloads)."""
    return Gateway(settings, registry, client, access_log, config_path)
