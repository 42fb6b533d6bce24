"""Keeping the gateway informed: register, heartbeat with load, re-register, deregister.

The agent registers only the roles whose backend is ready, and registers again whenever that
set changes (a ``llama-server`` crashed, or finished loading), so the gateway's ``/ready`` and
``/v1/models`` say what this node can serve now. Between changes it heartbeats every
``heartbeat_interval_s`` with its load: requests in flight through the agent, and slot use
from each ``llama-server``'s ``/slots``. A heartbeat answered 404 means the gateway forgot the
node (it restarted): the agent registers again at once. While the gateway is unreachable the
agent retries with back-off capped at the heartbeat interval, so a gateway that comes back is
served again within one interval.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson

from ..common.backoff import Backoff
from ..common.errors import Refused, RoleMeshError
from ..common.http1 import Client
from ..common.probe import fetch_model_info
from ..common.protocol import NODE_KEY, HeartbeatRequest, RegisterRequest, RegisterResponse
from ..common.version import __version__
from .config import AgentConfig
from .supervisor import Supervisor

log = logging.getLogger("rolemesh.agent.registration")

_FIRST_RETRY_S = 0.5
_SLOTS_TIMEOUT_S = 1.0


class Registrar:
    """Owns this node's standing at the gateway."""

    def __init__(
        self, cfg: AgentConfig, client: Client, supervisor: Supervisor, inflight: Callable[[], int]
    ) -> None:
        self.cfg = cfg
        self._client = client
        self._supervisor = supervisor
        self._inflight = inflight
        self._headers = [(NODE_KEY, cfg.node_key.encode("ascii"))] if cfg.node_key else []
        self._target = f"gateway {cfg.gateway_url}"
        #: Roles the gateway currently has for this node; None when it has none.
        self.registered: tuple[str, ...] | None = None
        self._problem: str | None = None
        #: Per role: the server URL it was asked at, and what it said about its model.
        self._model_info: dict[str, tuple[str, dict[str, Any] | None]] = {}
        #: Retry delays while the gateway is unreachable or refuses: capped at the interval.
        self.backoff = Backoff(_FIRST_RETRY_S, cfg.heartbeat_interval_s)

    # -- the loop -----------------------------------------------------------------------
    async def run(self) -> None:
        interval = self.cfg.heartbeat_interval_s
        while True:
            try:
                await self.tick()
            except RoleMeshError as exc:
                if exc.message != self._problem:
                    log.warning("%s; retrying (at least every %gs)", exc.message, interval)
                self._problem = exc.message
                delay = self.backoff.next()
            else:
                if self._problem is not None:
                    log.info("gateway %s is reachable again", self.cfg.gateway_url)
                self._problem = None
                self.backoff.reset()
                delay = interval
            # Wake early when a role becomes ready or goes down: the gateway should know now.
            await self._supervisor.wait_for_change(delay)

    async def tick(self) -> None:
        """One step: (re-)register if the ready roles changed, else heartbeat."""
        roles = tuple(self._supervisor.ready_roles())
        if roles != self.registered or self._info_missing():
            if roles:
                await self.register(roles)
            elif self.registered is not None:
                log.warning("no role is ready on this node; leaving the gateway until one is")
                await self.deregister()
            return
        if not roles:
            return
        load = await self.load()
        req = HeartbeatRequest(node_id=self.cfg.node_id, cold_roles=self._supervisor.cold_roles(), **load)
        status, body = await self._call("POST", "/v1/nodes/heartbeat", req.model_dump(exclude_none=True))
        if status == 404:
            log.info("gateway does not know node %s (it restarted?); registering again", self.cfg.node_id)
            self.registered = None
            await self.register(roles)
        elif status != 200:
            raise Refused(_refusal("heartbeat", status, body))

    async def register(self, roles: tuple[str, ...]) -> None:
        load = await self.load()
        req = RegisterRequest(
            node_id=self.cfg.node_id,
            base_url=self.cfg.base_url,
            roles=list(roles),
            version=__version__,
            models=await self.model_info(roles) or None,
            inflight=load.get("inflight"),
            slots_total=load.get("slots_total"),
            slots_busy=load.get("slots_busy"),
            cold_roles=self._supervisor.cold_roles(),
        )
        status, body = await self._call("POST", "/v1/nodes/register", req.model_dump(exclude_none=True))
        if status not in (200, 201):
            raise Refused(_refusal("registration", status, body))
        self.registered = roles
        log.info(
            "registered node %s at %s as %s with roles %s",
            self.cfg.node_id,
            self.cfg.gateway_url,
            self.cfg.base_url,
            ", ".join(roles),
        )
        try:
            answer = RegisterResponse.model_validate(body)
        except ValueError:
            return  # an older or newer gateway: the hint is optional
        if self.cfg.heartbeat_interval_s >= answer.stale_after_s:
            log.warning(
                "heartbeat_interval_s (%gs) is not below the gateway's stale timeout (%gs): this node "
                "will flap between fresh and stale; use at most %gs",
                self.cfg.heartbeat_interval_s,
                answer.stale_after_s,
                answer.heartbeat_interval_hint_s,
            )

    def _info_missing(self) -> bool:
        """Has a server started (an on-demand load) whose model the gateway was not told of yet?"""
        if self.registered is None:
            return False
        return any(
            role in self.registered and self._model_info.get(role, ("", None))[0] != b.url
            for role, b in self._supervisor.ready_backends().items()
        )

    async def model_info(self, roles: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        """What each ready role's server says about its model, asked once per server start."""
        ready = self._supervisor.ready_backends()
        for role in roles:
            backend = ready.get(role)
            if backend is None or backend.url is None:
                continue
            known = self._model_info.get(role)
            if known is None or known[0] != backend.url:
                info = await fetch_model_info(self._client, backend.url, _SLOTS_TIMEOUT_S, backend.auth, role)
                self._model_info[role] = (backend.url, info)
        return {r: info for r, (_, info) in self._model_info.items() if r in roles and info is not None}

    async def drain(self) -> None:
        """Ask the gateway to send this node no new requests (the agent is stopping)."""
        if self.registered is None:
            return
        try:
            status, body = await self._call("POST", f"/v1/nodes/{self.cfg.node_id}/drain", None)
        except RoleMeshError as exc:
            log.warning("could not drain node %s at the gateway: %s", self.cfg.node_id, exc.message)
            return
        if status == 200:
            log.info(
                "node %s draining at %s: no new requests, those in flight finish",
                self.cfg.node_id,
                self.cfg.gateway_url,
            )
        else:
            log.warning(
                "gateway refused to drain node %s: %s", self.cfg.node_id, _refusal("drain", status, body)
            )

    async def deregister(self) -> None:
        """Tell the gateway to forget this node (clean shutdown, or no role ready)."""
        if self.registered is None:
            return
        status, body = await self._call("DELETE", f"/v1/nodes/{self.cfg.node_id}", None)
        if status not in (200, 404):
            raise Refused(_refusal("deregistration", status, body))
        self.registered = None
        log.info("deregistered node %s from %s", self.cfg.node_id, self.cfg.gateway_url)

    # -- load ---------------------------------------------------------------------------
    async def load(self) -> dict[str, int]:
        """In-flight requests, plus slot use summed over the llama-servers that report it."""
        out = {"inflight": self._inflight()}
        urls = self._supervisor.slot_urls()
        counts = await asyncio.gather(*(self._slots(url) for url in urls))
        known = [c for c in counts if c is not None]
        if known:
            out["slots_total"] = sum(total for total, _ in known)
            out["slots_busy"] = sum(busy for _, busy in known)
        return out

    async def _slots(self, url: str) -> tuple[int, int] | None:
        """``(total, busy)`` from llama-server's ``/slots``; None where it is not offered."""
        try:
            status, raw = await self._client.request("GET", url, (), b"", _SLOTS_TIMEOUT_S, url)
            slots = orjson.loads(raw) if status == 200 else None
        except (RoleMeshError, orjson.JSONDecodeError):
            return None
        if not isinstance(slots, list):
            return None
        busy = sum(1 for s in slots if isinstance(s, dict) and _is_busy(s))
        return len(slots), busy

    # -- HTTP -----------------------------------------------------------------------------
    async def _call(self, method: str, path: str, payload: dict[str, Any] | None) -> tuple[int, Any]:
        # Through the one upstream client: the same errors, and a keep-alive connection the
        # gateway closed between two heartbeats is retried at once on a fresh one.
        headers = list(self._headers)
        body = b""
        if payload is not None:
            headers.append((b"content-type", b"application/json"))
            body = orjson.dumps(payload)
        url = f"{self.cfg.gateway_url}{path}"
        status, raw = await self._client.request(
            method, url, headers, body, self.cfg.gateway_timeout_s, self._target
        )
        try:
            return status, orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            return status, None


def _is_busy(slot: dict[str, Any]) -> bool:
    # Newer llama-server reports is_processing; older ones a state (0 idle, else busy).
    if "is_processing" in slot:
        return bool(slot["is_processing"])
    return bool(slot.get("state", 0) != 0)


def _refusal(what: str, status: int, body: Any) -> str:
    message = body.get("error", {}).get("message") if isinstance(body, dict) else None
    hint = ""
    if status == 401:
        hint = "; node_key must be one of the gateway's auth.node_api_keys"
    return f"gateway refused {what} with HTTP {status}: {message or body}{hint}"
