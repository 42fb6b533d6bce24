"""The gateway's ASGI application: dispatch and lifespan, nothing else.

Deliberately a plain ASGI callable rather than a framework: the inference path is a dict
lookup, a header scan and a JSON parse before the request goes upstream. The endpoints live in
:mod:`.inference`, :mod:`.api_status` and :mod:`.api_nodes`; routes in :mod:`.routes`.
"""

from __future__ import annotations

import asyncio
import logging

from ..common.asgi import Dispatcher, Receive, Scope, Send, header, lifespan, send_error
from ..common.endpoints import ANTHROPIC_PATHS, ROUTED
from ..common.errors import RoleMeshError
from ..common.http1 import Client
from ..common.tasks import TaskOwner
from ..common.version import __version__
from .api_nodes import NODES_PREFIX, NodesAPI
from .api_status import MODELS_PREFIX, StatusAPI
from .cors import Cors
from .guard import Guard
from .health import HealthMonitor
from .inference import Inference
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
        self, settings: Settings, registry: NodeRegistry | None = None, client: Client | None = None
    ) -> None:
        self.settings = settings
        self.client = client or Client(keepalive_s=30.0)
        self.registry = registry or make_registry(settings)
        self.guard = Guard(settings.auth)
        self.health = HealthMonitor(settings, self.client)
        policy = NodePolicy(settings.nodes.allowed_networks)
        self.routes = build_routes(
            settings, self.client, self.registry, self.health, self.guard.nodes, policy.allows
        )
        self.tasks = TaskOwner()

        inference = Inference(settings, self.routes, self.guard)
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
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


def create_app(
    settings: Settings, registry: NodeRegistry | None = None, client: Client | None = None
) -> Gateway:
    """Build the gateway ASGI app from validated settings."""
    return Gateway(settings, registry, client)
