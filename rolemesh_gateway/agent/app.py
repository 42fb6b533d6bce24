"""The node agent's ASGI application: ``/health``, and the llama-server endpoints proxied by role.

The paths are those the gateway sends (``common.endpoints``: ``/v1/*``, ``/tokenize``,
``/infill``, ``GET /props?model=``...). A request's ``model`` names the role; the agent relays
it to that role's local server with the gateway's own relay (SSE chunk by chunk, unbuffered)
and cancels the upstream request when the caller hangs up, which frees the llama.cpp slot.
Everything except ``/health`` needs the node key (``X-RoleMesh-Node-Key``, which the gateway
sends, or ``Authorization: Bearer``).

The lifespan owns the rest of the agent: it starts the supervisor and the registration loop,
and on shutdown deregisters first (so the gateway stops routing here), then stops the
children, then closes the connection pool, each step bounded.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any
from urllib.parse import parse_qsl

import orjson
from prometheus_client import CONTENT_TYPE_LATEST

from ..common.asgi import (
    Dispatcher,
    Headers,
    Message,
    Receive,
    Scope,
    Send,
    cancel_on_disconnect,
    lifespan,
    raw_target,
    read_json_object,
    send_bytes,
    send_error,
    send_json,
)
from ..common.auth import KeyRing
from ..common.config import bearer_header
from ..common.endpoints import ANTHROPIC_PATHS, UPSTREAM
from ..common.errors import (
    BadRequest,
    ConfigError,
    Forbidden,
    ModelNotFound,
    NoUpstreamAvailable,
    RoleMeshError,
    Unauthorized,
)
from ..common.http1 import Client
from ..common.relay import pass_through, upstream_headers
from ..common.tasks import TaskOwner, on_signal
from ..common.tls import client_context, reload_tls, server_context
from .config import AgentConfig, load_config
from .metrics import AgentStats, exposition
from .ondemand import LoadStats
from .registration import Registrar
from .supervisor import Supervisor

log = logging.getLogger("rolemesh.agent")


class Agent:
    """The node agent as an ASGI app. Build with :func:`create_app`."""

    def __init__(
        self, cfg: AgentConfig, client: Client | None = None, config_path: str | None = None
    ) -> None:
        self.cfg = cfg
        #: The file SIGHUP reloads (None: nothing to reload).
        self.config_path = config_path
        self.client = client or Client(keepalive_s=30.0)
        self.client.ssl_context = client_context(cfg.tls)
        #: The context the server listens with (None: plain HTTP); a reload loads new files into it.
        self.server_ssl = server_context(cfg.tls)
        self.inflight = 0
        self._idle = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.supervisor = Supervisor(cfg, self.client)
        #: Requests in flight per role (a role a reload retires is stopped when its count is 0;
        #: an on-demand server is never stopped while its count is above 0).
        self.role_inflight: dict[str, int] = self.supervisor.on_demand.inflight
        self.registrar = Registrar(cfg, self.client, self.supervisor, lambda: self.inflight)
        self._tasks = TaskOwner()
        self.stats = AgentStats()
        self._keys = KeyRing([cfg.node_key] if cfg.node_key else [])
        self._allowed_names = allowed_names(cfg)
        self._rewrite = {role: rc.upstream_model for role, rc in cfg.roles.items() if rc.upstream_model}
        self._auth = {role: bearer_header(rc.api_key) for role, rc in cfg.roles.items() if rc.api_key}
        d = self._dispatch = Dispatcher()
        d.add("GET", "/health", self._health)
        d.add("GET", "/v1/models", self._models)
        d.add("GET", "/metrics", self._metrics)
        for method, path in UPSTREAM:
            d.add(method, path, self._proxy)
        d.add_prefix("POST", "/v1/", self._proxy)  # any other OpenAI-style endpoint of llama-server

    # -- ASGI -------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                if scope["path"] != "/health":  # everything else is for the gateway only
                    self._check_key(scope["headers"])
                    if self._allowed_names is not None:
                        self._check_name(scope)
                await self._dispatch.find(scope["method"], scope["path"])(scope, receive, send)
            except RoleMeshError as exc:
                await send_error(send, exc, anthropic=scope["path"] in ANTHROPIC_PATHS)
        elif scope["type"] == "lifespan":
            await lifespan(receive, send, self.startup, self.shutdown)

    def _check_name(self, scope: Scope) -> None:
        """``tls.allowed_client_names``: the client certificate must name one of them."""
        allowed = self._allowed_names or frozenset()
        tls = scope.get("extensions", {}).get("tls") or {}
        names = tuple(tls.get("client_cert_names", ()))
        if not allowed.intersection(names):
            shown = ", ".join(names) or "nothing"
            raise Forbidden(
                f"the client certificate names {shown}; this agent serves only "
                f"{', '.join(sorted(allowed))} (tls.allowed_client_names)"
            )

    def _check_key(self, headers: Headers) -> None:
        if self._keys and self._keys.check_node(headers, bearer_too=True) is None:
            raise Unauthorized(
                "missing or invalid node key: this agent serves only the gateway "
                "(send X-RoleMesh-Node-Key: <node key>)"
            )

    async def startup(self) -> None:
        if not self._keys:
            log.warning(
                "NO NODE KEY CONFIGURED: anyone who can reach this agent can use its models. "
                "Set node_key (one of the gateway's auth.node_api_keys)."
            )
        self._loop = asyncio.get_running_loop()
        self.supervisor.start()
        self._tasks.start("register-heartbeat", self.registrar.run())
        on_signal(signal.SIGHUP, self.reload)
        self._tasks.every("close-idle-upstream-connections", 10.0, self.client.sweep)
        log.info(
            "node agent %s listening for the gateway at %s; roles: %s",
            self.cfg.node_id,
            self.cfg.base_url,
            ", ".join(self.cfg.roles),
        )

    def exiting(self) -> None:
        """SIGTERM or SIGINT arrived (called from the signal handler): drain this node at the
        gateway at once, so no new request comes while uvicorn lets those in flight finish;
        children that exit from now on stay stopped."""
        self.supervisor.exiting()
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(lambda: self._tasks.start("drain", self.registrar.drain()))

    def reload(self) -> bool:
        """Read the config file again (SIGHUP): roles added start, roles removed stop after their
        requests in flight, a role whose settings changed restarts; the rest stays running."""
        if self.config_path is None:
            log.warning("reload asked, but this agent was not started from a config file")
            return False
        try:
            cfg = load_config(self.config_path, overrides={"host": self.cfg.host, "port": self.cfg.port})
        except ConfigError as exc:
            log.error("config reload refused, still running the previous config: %s", exc)
            return False
        fixed = ("node_id", "gateway_url", "node_key", "advertise_url", "host", "port")
        moved = [k for k in fixed if getattr(cfg, k) != getattr(self.cfg, k)]
        if moved:
            log.error(
                "config reload refused, still running the previous config: %s: %s need a restart",
                self.config_path,
                ", ".join(moved),
            )
            return False
        problem = reload_tls(self.server_ssl, cfg.tls)
        if problem is not None:
            log.error(
                "config reload refused, still running the previous config: %s: %s", self.config_path, problem
            )
            return False
        self.client.ssl_context = client_context(cfg.tls)
        added, removed, changed = self.supervisor.apply(cfg, self._wait_idle)
        self.cfg = cfg
        self.registrar.cfg = cfg
        self._allowed_names = allowed_names(cfg)
        self._rewrite = {role: rc.upstream_model for role, rc in cfg.roles.items() if rc.upstream_model}
        self._auth = {role: bearer_header(rc.api_key) for role, rc in cfg.roles.items() if rc.api_key}
        log.info(
            "config reloaded from %s: added %s; removed %s; restarted %s",
            self.config_path,
            ", ".join(added) or "none",
            ", ".join(removed) or "none",
            ", ".join(changed) or "none",
        )
        return True

    async def _wait_idle(self, role: str) -> None:
        while self.role_inflight.get(role, 0) > 0:
            self._idle.clear()
            await self._idle.wait()

    async def shutdown(self) -> None:
        """Deregister, stop the children, close the pool; each step bounded."""
        on_signal(signal.SIGHUP, None)
        await self._tasks.stop()
        try:
            async with asyncio.timeout(self.cfg.gateway_timeout_s + 1):
                await self.registrar.deregister()
        except (TimeoutError, RoleMeshError) as exc:
            log.warning("could not deregister from the gateway (%s); it will mark this node stale", exc)
        await self.supervisor.stop()
        await self.client.close()

    # -- endpoints --------------------------------------------------------------------------
    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        roles = {role: b.state for role, b in self.supervisor.backends.items()}
        await send_json(send, 200, {"status": "ok", "node_id": self.cfg.node_id, "roles": roles})

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        data = [
            {"id": role, "object": "model", "created": 0, "owned_by": self.cfg.node_id}
            for role in self.supervisor.ready_roles()
        ]
        detail = {role: b.describe() for role, b in self.supervisor.backends.items()}
        await send_json(send, 200, {"object": "list", "data": data, "rolemesh": {"roles": detail}})

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await exposition(self.supervisor, self.stats, self.client)
        await send_bytes(send, 200, body, [(b"content-type", CONTENT_TYPE_LATEST.encode())])

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: Headers = scope["headers"]
        if scope["method"] == "GET":  # GET /props?model=<role>
            body, data = b"", dict[str, Any]()
            query = parse_qsl(scope.get("query_string", b"").decode("latin-1"))
            role: object = next((v for k, v in query if k == "model"), None)
        else:
            body, data = await read_json_object(receive, headers, self.cfg.limits.max_body_bytes)
            role = data.get("model")
        backends = self.supervisor.backends
        if role is None and len(backends) == 1:
            role = next(iter(backends))
        if type(role) is not str:
            raise BadRequest(f"'model' must name a role: one of {', '.join(backends)}", param="model")
        backend = backends.get(role)
        if backend is None:
            raise ModelNotFound(
                f"node {self.cfg.node_id} serves no role '{role}'; it serves: {', '.join(backends)}",
                param="model",
            )
        path = raw_target(scope)  # an odd path is refused before anything waits for a server
        if not backend.on_demand and (not backend.ready or backend.url is None):
            why = f" ({backend.detail})" if backend.detail else ""
            raise NoUpstreamAvailable(f"role '{role}' on node {self.cfg.node_id} is {backend.state}{why}")
        if role in self._rewrite and body:
            data["model"] = self._rewrite[role]
            body = orjson.dumps(data)
        out = upstream_headers(headers, self._auth.get(role, []))
        # Counted from here, before any wait for a load: an on-demand server with a request in
        # flight is never stopped (idle or for room).
        self.inflight += 1
        self.role_inflight[role] = self.role_inflight.get(role, 0) + 1
        status = _Status(send)
        started = time.monotonic()
        waited = 0.0

        async def work() -> None:
            nonlocal waited
            if backend.on_demand:
                waited = await self.supervisor.on_demand.ready(role, self.cfg.node_id)
            if backend.url is None:  # pragma: no cover - ready implies a URL
                raise NoUpstreamAvailable(f"role '{role}' on node {self.cfg.node_id} is {backend.state}")
            # Kept alive when the backend allows it. llama-server closes its end after a
            # streamed answer; the client then drops that connection from its pool (or, if the
            # next request races the close, sends it again on a fresh one).
            await pass_through(
                self.client,
                scope["method"],
                backend.url + path,
                out,
                body,
                self.cfg.timeouts,
                status,
                [],
                f"role {role} ({backend.url})",
                anthropic=scope["path"] in ANTHROPIC_PATHS,
                write_timeout_s=self.cfg.limits.write_timeout_s,
            )

        try:
            await cancel_on_disconnect(receive, work())
        except RoleMeshError as exc:
            status.status = exc.status
            raise
        finally:
            self.inflight -= 1
            self.role_inflight[role] -= 1
            self._idle.set()
            self.stats.requests[(role, status.status or 499)] += 1
            if backend.on_demand:
                self.supervisor.on_demand.used(role)
                if waited:
                    self._cold_start(role, started, waited, status.first_at)

    def _cold_start(self, role: str, started: float, waited: float, first_at: float | None) -> None:
        """Log and count the first byte of a request that waited for its model to load."""
        if first_at is None:
            return
        first = first_at - started
        LoadStats.add(self.supervisor.on_demand.stats.cold_first_byte, role, first)
        log.info(
            "role %s: first byte after %.2fs, of which %.2fs waiting for the model to load",
            role,
            first,
            waited,
        )


class _Status:
    """``send``, remembering the status of the answer (for the request counter)."""

    __slots__ = ("_send", "first_at", "status")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.status = 0
        #: When the first body bytes went out (monotonic), for the cold-start report.
        self.first_at: float | None = None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif self.first_at is None and message.get("body"):
            self.first_at = time.monotonic()
        await self._send(message)


def create_app(cfg: AgentConfig, client: Client | None = None, config_path: str | None = None) -> Agent:
    """Build the node agent ASGI app from a validated config (``config_path``: what SIGHUP reloads)."""
    return Agent(cfg, client, config_path)


def allowed_names(cfg: AgentConfig) -> frozenset[str] | None:
    """The client certificate names that may call the agent (``tls.allowed_client_names``)."""
    names = cfg.tls.allowed_client_names
    return frozenset(names) if names is not None else None
