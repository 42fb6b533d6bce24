"""The node API: register, heartbeat and deregister (node key), and the operator's node list.

Bodies are the wire models of :mod:`rolemesh_gateway.common.protocol`, read with a small size
limit and validated strictly; a body that does not fit is one 400 that says which field.

Who may act for a node (``nodes.identity``): the holder of a node key (``key``), the holder of
a client certificate that names the node (``certificate``: a DNS subjectAltName or the subject
CN equal to its node_id, checked by the gateway's mutual TLS), or both. A refusal for the
certificate is logged with the names it carries.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from ..common.asgi import Receive, Scope, Send, read_json_object, send_json
from ..common.errors import BadRequest, Forbidden, NodeNotFound, NotFound, Unauthorized, wire_error
from ..common.protocol import HeartbeatRequest, RegisterRequest, RegisterResponse
from .guard import Guard
from .node_policy import NodePolicy
from .registry import NodeRegistry
from .settings import Settings

log = logging.getLogger("rolemesh.nodes")

#: Registration and heartbeat bodies are small; anything larger is refused unread.
MAX_WIRE_BODY = 64 * 1024
NODES_PREFIX = "/v1/nodes/"


class NodesAPI:
    """Node membership, as the agents and operators see it."""

    def __init__(self, settings: Settings, registry: NodeRegistry, guard: Guard, policy: NodePolicy) -> None:
        self._registry = registry
        self._guard = guard
        self._policy = policy
        self._stale_after_s = settings.nodes.stale_after_s
        self._identity = settings.nodes.identity
        self._https_only = settings.nodes.verify_server_names

    # -- who is calling -------------------------------------------------------------------------
    def _caller(self, scope: Scope, action: str) -> str | None:
        """Check what ``nodes.identity`` asks for before the body is read: the node key (its id is
        returned; None in open or certificate mode), and that a client certificate came."""
        key_id = self._guard.node(scope["headers"]) if self._identity != "certificate" else None
        if self._identity != "key" and not _cert_names(scope):
            self._refuse(
                scope,
                action,
                Unauthorized(
                    f"{action} needs a client certificate that names the node (nodes.identity: "
                    f"{self._identity}); none was presented: connect over https with tls.client_cert_file"
                ),
            )
        return key_id

    def _check_name(self, scope: Scope, node_id: str, action: str) -> None:
        """With certificate identity, the certificate must name ``node_id``."""
        if self._identity == "key":
            return
        names = _cert_names(scope)
        if node_id not in names:
            self._refuse(
                scope,
                action,
                Forbidden(
                    f"the client certificate names {', '.join(names)}, not node '{node_id}' "
                    f"(nodes.identity: {self._identity}); use the certificate made for {node_id}"
                ),
            )

    @staticmethod
    def _refuse(scope: Scope, action: str, exc: Unauthorized | Forbidden) -> None:
        client = scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else "?"
        log.warning("%s from %s refused: %s", action, peer, exc.message)
        raise exc

    # -- endpoints ------------------------------------------------------------------------------
    async def register(self, scope: Scope, receive: Receive, send: Send) -> None:
        key_id = self._caller(scope, "registration")
        _, data = await read_json_object(receive, scope["headers"], MAX_WIRE_BODY)
        try:
            req = RegisterRequest.model_validate(data)
        except ValidationError as exc:
            raise wire_error(exc, "registration") from None
        self._check_name(scope, req.node_id, f"registration of node '{req.node_id}'")
        if self._https_only and not req.base_url.startswith("https://"):
            raise BadRequest(
                f"base_url {req.base_url!r} is not https: this gateway checks each node's server "
                "certificate (nodes.verify_server_names); serve the agent with tls.cert_file"
            )
        await self._policy.check_registration(req.base_url, scope.get("server"))
        node, new = await self._registry.register(req, key_id)
        log.info(
            "node %s %s: %s roles=%s",
            node.node_id,
            "registered" if new else "re-registered",
            node.base_url,
            ",".join(node.roles),
        )
        s = self._stale_after_s
        resp = RegisterResponse(
            node_id=node.node_id, stale_after_s=s, heartbeat_interval_hint_s=max(1.0, s / 3)
        )
        await send_json(send, 201 if new else 200, resp.model_dump())

    async def heartbeat(self, scope: Scope, receive: Receive, send: Send) -> None:
        key_id = self._caller(scope, "heartbeat")
        _, data = await read_json_object(receive, scope["headers"], MAX_WIRE_BODY)
        try:
            req = HeartbeatRequest.model_validate(data)
        except ValidationError as exc:
            raise wire_error(exc, "heartbeat") from None
        self._check_name(scope, req.node_id, f"heartbeat of node '{req.node_id}'")
        node = await self._registry.heartbeat(req, key_id)
        if node is None:
            raise NodeNotFound(f"node '{req.node_id}' is not registered; register it again")
        await send_json(send, 200, {"node_id": node.node_id, "status": "ok"})

    async def deregister(self, scope: Scope, receive: Receive, send: Send) -> None:
        key_id = self._caller(scope, "deregistration")
        node_id = scope["path"][len(NODES_PREFIX) :]
        self._check_name(scope, node_id, f"deregistration of node '{node_id}'")
        if "/" in node_id or not await self._registry.deregister(node_id, key_id):
            raise NodeNotFound(f"node '{node_id}' is not registered")
        log.info("node %s deregistered", node_id)
        await send_json(send, 200, {"node_id": node_id, "status": "deregistered"})

    async def drain(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /v1/nodes/{id}/drain`` and ``.../undrain``: an admin key, or the node's own key.

        A draining node gets no new requests; those in flight and its streams finish.
        """
        rest = scope["path"][len(NODES_PREFIX) :]
        node_id, _, action = rest.partition("/")
        if action not in ("drain", "undrain") or not node_id:
            raise NotFound(f"no such endpoint: POST {scope['path']}")
        headers = scope["headers"]
        node = self._registry.get(node_id)
        if not self._guard.is_admin(headers):
            key_id = self._caller(scope, action)  # else 401
            self._check_name(scope, node_id, f"{action} of node '{node_id}'")
            if node is not None:
                self._registry.check_owner(node_id, node.key_id, key_id)
        node = await self._registry.set_draining(node_id, action == "drain")
        if node is None:
            raise NodeNotFound(f"node '{node_id}' is not registered")
        log.info(
            "node %s %s (in flight: %d)",
            node_id,
            "draining" if node.draining else "back in rotation",
            node.inflight,
        )
        await send_json(send, 200, {"node_id": node_id, "draining": node.draining, "inflight": node.inflight})

    async def list(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Every node, fresh or not, with its state by the same rule routing uses (operators only)."""
        self._guard.admin(scope["headers"])
        registry = self._registry
        now = registry.clock()
        nodes: list[dict[str, Any]] = []
        for n in sorted(registry.all_nodes(), key=lambda n: n.node_id):
            state = registry.state(n, now)
            nodes.append(
                {
                    "node_id": n.node_id,
                    "base_url": n.base_url,
                    "roles": list(n.roles),
                    "status": "stale" if state == "stale" else "fresh",
                    "state": state,
                    "seconds_since_heartbeat": round(now - n.last_seen, 3),
                    "ejected": n.ejected_until > now,
                    "draining": n.draining,
                    "inflight": n.inflight,
                    "slots_total": n.slots_total,
                    "slots_busy": n.slots_busy,
                    "version": n.version,
                    "cold_roles": sorted(n.cold),
                }
            )
        await send_json(send, 200, {"object": "list", "data": nodes, "stale_after_s": registry.stale_after_s})


def _cert_names(scope: Scope) -> tuple[str, ...]:
    """The names in the caller's verified client certificate (none over plain HTTP)."""
    tls = scope.get("extensions", {}).get("tls")
    return tuple(tls.get("client_cert_names", ())) if tls else ()
