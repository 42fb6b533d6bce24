"""The gateway's ASGI application: dispatch, auth, and the non-inference endpoints.

Deliberately a plain ASGI callable rather than a framework: the inference path is a dict
lookup, a header scan and a JSON parse before the request goes upstream.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from pydantic import ValidationError

from . import __version__
from .asgi import (
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
from .errors import (
    BadRequest,
    GatewayError,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    Unauthorized,
)
from .health import HealthMonitor
from .protocol import NODE_KEY, HeartbeatRequest, RegisterRequest, RegisterResponse
from .proxy import Forwarder, build_routes
from .registry import NodeRegistry, RegistryFull, make_registry
from .settings import Settings
from .tasks import TaskOwner
from .upstream import UpstreamClient, upstream_headers

log = logging.getLogger("rolemesh.gateway")

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]
INFERENCE_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
_MAX_REQUEST_ID = 200
_MAX_WIRE_BODY = 64 * 1024


def _bearer(value: bytes) -> bytes | None:
    if value[:7].lower() == b"bearer ":
        return value[7:].strip()
    return None


def _key_index(presented: bytes | None, keys: tuple[bytes, ...]) -> int:
    """Index of the matching key, compared in constant time against every key; -1 if none."""
    found = -1
    if presented is None:
        return found
    for i, key in enumerate(keys):
        if hmac.compare_digest(presented, key):
            found = i
    return found


class Gateway:
    """The RoleMesh gateway as an ASGI app. Build with :func:`create_app`."""

    def __init__(self, settings: Settings, registry: NodeRegistry | None = None) -> None:
        self.settings = settings
        self.client = UpstreamClient()
        self.registry = registry or make_registry(settings)

        self.health = HealthMonitor(settings, self.client)
        self.routes = build_routes(settings)
        self.forwarder = Forwarder(settings, self.client, self.registry, self.health)
        self.tasks = TaskOwner()
        self._client_keys = tuple(k.encode() for k in settings.auth.client_api_keys)
        self._node_keys = tuple(k.encode() for k in settings.auth.node_api_keys)
        self._open_mode = not self._client_keys and not self._node_keys
        self._max_body = settings.limits.max_body_bytes
        # Request ids: a random per-process prefix and a counter (unique, and far cheaper than uuid4).
        self._rid_prefix = os.urandom(6).hex().encode() + b"-"
        self._rid_counter = itertools.count(1)
        self._names = {
            name: alias for alias in settings.models for name in (alias, settings.advertised_name(alias))
        }
        self._endpoints: dict[str, dict[str, Handler]] = {
            "/health": {"GET": self._health},
            "/ready": {"GET": self._ready},
            "/v1/models": {"GET": self._models},
            "/v1/nodes": {"GET": self._list_nodes},
            "/v1/nodes/register": {"POST": self._register},
            "/v1/nodes/heartbeat": {"POST": self._heartbeat},
        }
        for path in INFERENCE_PATHS:
            self._endpoints[path] = {"POST": self._inference}

    # -- ASGI -------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            methods = self._endpoints.get(path)
            try:
                if methods is None:
                    if path.startswith("/v1/nodes/") and path.count("/") == 3:
                        methods = {"DELETE": self._deregister}
                    elif path.startswith("/v1/models/"):
                        methods = {"GET": self._model}
                    else:
                        raise NotFound(f"no such endpoint: {scope['method']} {path}")
                handler = methods.get(scope["method"])
                if handler is None:
                    raise MethodNotAllowed(f"{path} accepts {', '.join(methods)}, not {scope['method']}")
                await handler(scope, receive, send)
            except GatewayError as exc:
                await send_error(send, exc)
        elif scope["type"] == "lifespan":
            await lifespan(receive, send, self.startup, self.shutdown)

    async def startup(self) -> None:
        """Open the upstream pool, probe once (so the first answers are right), start loops."""
        if self._open_mode:
            log.warning(
                "NO API KEYS CONFIGURED: anyone who can reach this gateway can use it "
                "and register nodes. Set auth.client_api_keys and auth.node_api_keys."
            )
        await self.client.start()
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
        if self.registry.sync_interval_s is not None:
            self.tasks.every("sync-shared-registry", self.registry.sync_interval_s, self.registry.sync)
        log.info(
            "RoleMesh gateway %s ready: %d aliases (%s)",
            __version__,
            len(self.routes),
            ", ".join(self.routes),
        )

    async def shutdown(self) -> None:
        await self.tasks.stop()
        await self.registry.close()
        await self.client.close()

    # -- auth ---------------------------------------------------------------------------------
    def _check_client(self, headers: Headers) -> None:
        if self._open_mode:
            return
        presented = None
        for k, v in headers:
            if k == b"x-api-key":
                presented = v
            elif k == b"authorization" and presented is None:
                presented = _bearer(v)
        if _key_index(presented, self._client_keys) < 0:
            raise Unauthorized(
                "missing API key: send it as 'X-Api-Key: <key>' or 'Authorization: Bearer <key>'"
                if presented is None
                else "invalid API key"
            )

    def _check_node(self, headers: Headers) -> int:
        """Index of the node key presented (-1 in open mode)."""
        if self._open_mode:
            return -1
        if not self._node_keys:
            raise Unauthorized("node registration is disabled: configure auth.node_api_keys")
        presented = header(headers, NODE_KEY)
        idx = _key_index(presented, self._node_keys)
        if idx < 0:
            raise Unauthorized("missing or invalid node key (X-RoleMesh-Node-Key)")
        return idx

    # -- inference ----------------------------------------------------------------------------
    async def _inference(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: Headers = scope["headers"]
        self._check_client(headers)
        body, data = await read_json_object(receive, headers, self._max_body)
        model = data.get("model")
        if model is None:
            alias = self.settings.default_model
        elif type(model) is not str:
            raise BadRequest("'model' must be a string", param="model")
        else:
            found = self._names.get(model)
            if found is None:
                raise ModelNotFound(
                    f"model '{model}' does not exist; configured: {', '.join(self.routes)}",
                    param="model",
                )
            alias = found
        route = self.routes[alias]
        if route.rewrite_model is not None and model != route.rewrite_model:
            data["model"] = route.rewrite_model
            body = orjson.dumps(data)
        rid = header(headers, b"x-request-id")
        if rid is not None and len(rid) <= _MAX_REQUEST_ID:
            out = upstream_headers(headers, [])  # the client's id passes through
        else:
            if rid is not None:  # absurdly long: replace it
                headers = [h for h in headers if h[0] != b"x-request-id"]
            rid = b"%s%x" % (self._rid_prefix, next(self._rid_counter))
            out = upstream_headers(headers, [(b"x-request-id", rid)])
        path = scope["path"]
        if scope.get("query_string"):
            path = f"{path}?{scope['query_string'].decode('latin-1')}"
        await cancel_on_disconnect(
            receive,
            self.forwarder.forward(route, scope["method"], path, out, body, send, [(b"x-request-id", rid)]),
        )

    # -- status endpoints ---------------------------------------------------------------------
    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, {"status": "ok"})

    async def _ready(self, scope: Scope, receive: Receive, send: Send) -> None:
        alias = self.settings.default_model
        ok, reason = self.forwarder.available(self.routes[alias])
        if ok:
            await send_json(send, 200, {"status": "ready", "default_model": alias})
        else:
            await send_json(send, 503, {"status": "not_ready", "default_model": alias, "reason": reason})

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._check_client(scope["headers"])
        data: list[dict[str, Any]] = []
        unavailable: list[str] = []
        aliases: dict[str, dict[str, Any]] = {}
        for alias, route in self.routes.items():
            name = self.settings.advertised_name(alias)
            ok, reason = self.forwarder.available(route)
            info: dict[str, Any] = {"id": name, "available": ok}
            if route.role is not None:
                fresh, stale = self.registry.count_for_role(route.role)
                info.update(
                    type="discovered",
                    role=route.role,
                    strategy=route.strategy_name,
                    fresh_nodes=fresh,
                    stale_nodes=stale,
                )
            else:
                info.update(type="proxy")
            if not ok:
                info["reason"] = reason
                unavailable.append(name)
            else:
                data.append({"id": name, "object": "model", "created": 0, "owned_by": "rolemesh"})
            aliases[alias] = info
        await send_json(
            send,
            200,
            {
                "object": "list",
                "data": data,
                "rolemesh": {"unavailable_models": unavailable, "aliases": aliases},
            },
        )

    async def _model(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``GET /v1/models/{id}`` (what ``client.models.retrieve`` calls)."""
        self._check_client(scope["headers"])
        name = scope["path"][len("/v1/models/") :]
        alias = self._names.get(name)
        if alias is None or not self.forwarder.available(self.routes[alias])[0]:
            raise ModelNotFound(f"model '{name}' does not exist or is not available now", param="model")
        advertised = self.settings.advertised_name(alias)
        await send_json(
            send, 200, {"id": advertised, "object": "model", "created": 0, "owned_by": "rolemesh"}
        )

    # -- nodes ----------------------------------------------------------------------------------
    async def _register(self, scope: Scope, receive: Receive, send: Send) -> None:
        idx = self._check_node(scope["headers"])
        _, data = await read_json_object(receive, scope["headers"], _MAX_WIRE_BODY)
        try:
            req = RegisterRequest.model_validate(data)
        except ValidationError as exc:
            raise BadRequest(_wire_error(exc), param=_wire_param(exc)) from None
        try:
            node, new = await self.registry.register(req, idx)
        except RegistryFull as exc:
            raise GatewayErrorFull(str(exc)) from None
        log.info(
            "node %s %s: %s roles=%s",
            node.node_id,
            "registered" if new else "re-registered",
            node.base_url,
            ",".join(node.roles),
        )
        s = self.settings.nodes.stale_after_s
        resp = RegisterResponse(
            node_id=node.node_id, stale_after_s=s, heartbeat_interval_hint_s=max(1.0, s / 3)
        )
        await send_json(send, 201 if new else 200, resp.model_dump())

    async def _heartbeat(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._check_node(scope["headers"])
        _, data = await read_json_object(receive, scope["headers"], _MAX_WIRE_BODY)
        try:
            req = HeartbeatRequest.model_validate(data)
        except ValidationError as exc:
            raise BadRequest(_wire_error(exc), param=_wire_param(exc)) from None
        node = await self.registry.heartbeat(req)
        if node is None:
            raise NotFound(f"node '{req.node_id}' is not registered; register it again")
        await send_json(send, 200, {"node_id": node.node_id, "status": "ok"})

    async def _deregister(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._check_node(scope["headers"])
        node_id = scope["path"].rsplit("/", 1)[1]
        if not await self.registry.deregister(node_id):
            raise NotFound(f"node '{node_id}' is not registered")
        log.info("node %s deregistered", node_id)
        await send_json(send, 200, {"node_id": node_id, "status": "deregistered"})

    async def _list_nodes(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._check_client(scope["headers"])
        now = time.time()
        nodes = []
        for n in sorted(self.registry.all_nodes(), key=lambda n: n.node_id):
            age = now - n.last_seen
            nodes.append(
                {
                    "node_id": n.node_id,
                    "base_url": n.base_url,
                    "roles": list(n.roles),
                    "status": "fresh" if age < self.registry.stale_after_s else "stale",
                    "seconds_since_heartbeat": round(age, 3),
                    "ejected": n.ejected_until > now,
                    "inflight": n.inflight,
                    "slots_total": n.slots_total,
                    "slots_busy": n.slots_busy,
                    "version": n.version,
                }
            )
        await send_json(
            send, 200, {"object": "list", "data": nodes, "stale_after_s": self.registry.stale_after_s}
        )


class GatewayErrorFull(GatewayError):
    status = 507
    type = "server_error"
    code = "registry_full"


def _wire_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"]) or "body"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"invalid node registration: {where}: {msg}"


def _wire_param(exc: ValidationError) -> str | None:
    loc = exc.errors(include_url=False)[0]["loc"]
    return str(loc[0]) if loc else None


def create_app(settings: Settings, registry: NodeRegistry | None = None) -> Gateway:
    """Build the gateway ASGI app from validated settings."""
    return Gateway(settings, registry)
