"""The node agent's ASGI application: ``/health``, and ``/v1/*`` proxied by role.

A request's ``model`` names the role; the agent relays it to that role's local server with
the gateway's own relay (SSE chunk by chunk, unbuffered) and cancels the upstream request when
the caller hangs up, which frees the llama.cpp slot. Everything except ``/health`` needs the
node key (``X-RoleMesh-Node-Key``, which the gateway sends, or ``Authorization: Bearer``).

The lifespan owns the rest of the agent: it starts the supervisor and the registration loop,
and on shutdown deregisters first (so the gateway stops routing here), then stops the
children, then closes the connection pool, each step bounded.
"""

from __future__ import annotations

import asyncio
import hmac
import logging

import orjson

from ..asgi import (
    Headers,
    Receive,
    Scope,
    Send,
    cancel_on_disconnect,
    header,
    lifespan,
    read_json_object,
    send_error,
    send_json,
)
from ..errors import (
    BadRequest,
    GatewayError,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    NoUpstreamAvailable,
    Unauthorized,
)
from ..protocol import NODE_KEY
from ..tasks import TaskOwner
from ..upstream import StreamBroken, UpstreamClient, relay, upstream_headers
from .config import AgentConfig
from .registration import GatewayProblem, Registrar
from .supervisor import Supervisor

log = logging.getLogger("rolemesh.agent")


class Agent:
    """The node agent as an ASGI app. Build with :func:`create_app`."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.client = UpstreamClient()
        self.supervisor = Supervisor(cfg, self.client)
        self.registrar = Registrar(cfg, self.client, self.supervisor, lambda: self.inflight)
        self.inflight = 0
        self._tasks = TaskOwner()
        self._key = cfg.node_key.encode() if cfg.node_key else None
        self._rewrite = {role: rc.upstream_model for role, rc in cfg.roles.items() if rc.upstream_model}

    # -- ASGI -------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                await self._dispatch(scope, receive, send)
            except GatewayError as exc:
                await send_error(send, exc)
        elif scope["type"] == "lifespan":
            await lifespan(receive, send, self.startup, self.shutdown)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if path == "/health":
            if method != "GET":
                raise MethodNotAllowed(f"/health accepts GET, not {method}")
            await self._health(send)
            return
        self._check_key(scope["headers"])
        if path == "/v1/models":
            if method != "GET":
                raise MethodNotAllowed(f"/v1/models accepts GET, not {method}")
            await self._models(send)
        elif path.startswith("/v1/"):
            if method != "POST":
                raise MethodNotAllowed(f"{path} accepts POST, not {method}")
            await self._proxy(scope, receive, send)
        else:
            raise NotFound(f"no such endpoint: {method} {path}")

    async def startup(self) -> None:
        if self._key is None:
            log.warning(
                "NO NODE KEY CONFIGURED: anyone who can reach this agent can use its models. "
                "Set node_key (one of the gateway's auth.node_api_keys)."
            )
        await self.client.start()
        self.supervisor.start()
        self._tasks.start("register-heartbeat", self.registrar.run())
        log.info(
            "node agent %s listening for the gateway at %s; roles: %s",
            self.cfg.node_id,
            self.cfg.base_url,
            ", ".join(self.cfg.roles),
        )

    async def shutdown(self) -> None:
        """Deregister, stop the children, close the pool; each step bounded."""
        await self._tasks.stop()
        try:
            async with asyncio.timeout(self.cfg.gateway_timeout_s + 1):
                await self.registrar.deregister()
        except (TimeoutError, GatewayProblem) as exc:
            log.warning("could not deregister from the gateway (%s); it will mark this node stale", exc)
        await self.supervisor.stop()
        await self.client.close()

    # -- endpoints --------------------------------------------------------------------------
    def _check_key(self, headers: Headers) -> None:
        if self._key is None:
            return
        presented = header(headers, NODE_KEY)
        if presented is None:
            auth = header(headers, b"authorization")
            if auth is not None and auth[:7].lower() == b"bearer ":
                presented = auth[7:].strip()
        if presented is None or not hmac.compare_digest(presented, self._key):
            raise Unauthorized(
                "missing or invalid node key: this agent serves only the gateway "
                "(send X-RoleMesh-Node-Key: <node key>)"
            )

    async def _health(self, send: Send) -> None:
        roles = {role: b.state for role, b in self.supervisor.backends.items()}
        await send_json(send, 200, {"status": "ok", "node_id": self.cfg.node_id, "roles": roles})

    async def _models(self, send: Send) -> None:
        data = [
            {"id": role, "object": "model", "created": 0, "owned_by": self.cfg.node_id}
            for role in self.supervisor.ready_roles()
        ]
        detail = {role: b.describe() for role, b in self.supervisor.backends.items()}
        await send_json(send, 200, {"object": "list", "data": data, "rolemesh": {"roles": detail}})

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: Headers = scope["headers"]
        body, data = await read_json_object(receive, headers, self.cfg.proxy.max_body_bytes)
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
        if not backend.ready or backend.url is None:
            why = f" ({backend.detail})" if backend.detail else ""
            raise NoUpstreamAvailable(f"role '{role}' on node {self.cfg.node_id} is {backend.state}{why}")
        if role in self._rewrite:
            data["model"] = self._rewrite[role]
            body = orjson.dumps(data)
        target = f"role {role} ({backend.url})"
        path = scope["path"]
        if scope.get("query_string"):
            path = f"{path}?{scope['query_string'].decode('latin-1')}"
        out = upstream_headers(headers, [])
        self.inflight += 1
        try:
            await cancel_on_disconnect(
                receive, self._forward(scope["method"], backend.url + path, out, body, send, target)
            )
        finally:
            self.inflight -= 1

    async def _forward(
        self, method: str, url: str, headers: Headers, body: bytes, send: Send, target: str
    ) -> None:
        resp = await self.client.open(method, url, headers, body, self.cfg.proxy.timeouts, target)
        try:
            await relay(resp, send, [], target)
        except StreamBroken:
            pass  # the caller got an SSE error event; relay logged it
        finally:
            # Kept alive when the backend allows it. llama-server closes its end after a
            # streamed answer; the client then drops that connection from its pool (or, if the
            # next request races the close, sends it again on a fresh one).
            resp.release()


def create_app(cfg: AgentConfig) -> Agent:
    """Build the node agent ASGI app from a validated config."""
    return Agent(cfg)
