"""The gateway's ASGI application: dispatch and lifespan, nothing else.

Deliberately a plain ASGI callable rather than a framework: the inference path is a dict
lookup, a header scan and a JSON parse before the request goes upstream. The endpoints live in
:mod:`.inference`, :mod:`.api_status` and :mod:`.api_nodes`; routes in :mod:`.routes`.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CONTENT_TYPE_LATEST

from ..common.asgi import Dispatcher, Message, Receive, Scope, Send, header, lifespan, send_bytes, send_error
from ..common.endpoints import ANTHROPIC_PATHS, ROUTED
from ..common.errors import RoleMeshError
from ..common.http1 import Client
from ..common.logs import RequestLog, current_request
from ..common.tasks import TaskOwner
from ..common.version import __version__
from .api_nodes import NODES_PREFIX, NodesAPI
from .api_status import MODELS_PREFIX, StatusAPI
from .cors import Cors
from .guard import Guard
from .health import HealthMonitor
from .inference import Inference
from .metrics import Collector, Stats, exposition
from .node_policy import NodePolicy
from .registry import NodeRegistry, make_registry
from .routes import build_routes
from .settings import Settings

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
    ) -> None:
        self.settings = settings
        self.stats = Stats()
        self.client = client or Client(keepalive_s=30.0)
        self.registry = registry or make_registry(settings)
        self.guard = Guard(settings.auth)
        self.health = HealthMonitor(settings, self.client)
        policy = NodePolicy(settings.nodes.allowed_networks)
        self.routes = build_routes(
            settings, self.client, self.registry, self.health, self.guard.nodes, policy.allows, self.stats
        )
        self.tasks = TaskOwner()
        self.collector = Collector(self.stats, self.registry, self.routes)

        inference = self.inference = Inference(settings, self.routes, self.guard, self.stats, access_log)
        status = StatusAPI(settings, self.routes, self.guard, inference)
        nodes = NodesAPI(settings, self.registry, self.guard, policy)
        self._cors = Cors(settings.cors) if settings.cors.allow_origins else None
        d = self._dispatch = Dispatcher()
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
        d.add("GET", "/metrics", self.metrics)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # Every answer, errors included, carries the request id; every log line about the
            # request too (through the context variable).
            rid = self.inference.request_id(scope["headers"])
            scope["rolemesh.request_id"] = rid
            current_request.set(RequestLog(rid.decode("ascii")))
            send = _with_request_id(send, rid)
            if self._cors is not None:
                origin = header(scope["headers"], b"origin")
                if origin is not None and self._cors.allowed(origin):
                    if scope["method"] == "OPTIONS":
                        await self._cors.preflight(scope, send, origin)
                        return
                    send = self._cors.wrap(send, origin)
            try:
                await self._dispatch.find(scope["method"], scope["path"])(scope, receive, send)
            except RoleMeshError as exc:
                await send_error(send, exc, anthropic=scope["path"] in ANTHROPIC_PATHS)
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
                await self.health.probe_all()
        except TimeoutError:
            pass
        self.tasks.every("probe-upstreams", p.interval_s, self.health.probe_all)
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
) -> Gateway:
    """Build the gateway ASGI app from validated settings."""
    return Gateway(settings, registry, client, access_log)
