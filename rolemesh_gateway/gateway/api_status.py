"""The status endpoints: ``/health``, ``/ready``, ``/v1/models`` and ``/v1/models/{id}``.

Availability is asked of each route (:meth:`~rolemesh_gateway.gateway.routes.Route.available`),
so these answers and the routing agree on what can serve now.
"""

from __future__ import annotations

import time
from typing import Any

from ..common.asgi import Receive, Scope, Send, send_json
from ..common.errors import ModelNotFound, NoUpstreamAvailable, RoleMeshError
from .guard import Guard
from .inference import Inference
from .routes import Route
from .settings import Settings

MODELS_PREFIX = "/v1/models/"


class StatusAPI:
    """Read-only answers about the gateway and its aliases."""

    def __init__(
        self, settings: Settings, routes: dict[str, Route], guard: Guard, inference: Inference
    ) -> None:
        self._settings = settings
        self._routes = routes
        self._guard = guard
        self._inference = inference
        #: The ``created`` of every model object: when this gateway started serving them.
        self._created = int(time.time())

    async def health(self, scope: Scope, receive: Receive, send: Send) -> None:
        """200 while the process is up; nothing else is checked."""
        await send_json(send, 200, {"status": "ok"})

    async def ready(self, scope: Scope, receive: Receive, send: Send) -> None:
        """200 when the default alias can serve now, else 503 with the reason.

        Without a key the reason is in general words; the details (upstream URLs, node counts)
        only go to a caller with a client key that may use the default alias.
        """
        alias = self._settings.default_alias
        ok, reason = self._routes[alias].available()
        if ok:
            await send_json(send, 200, {"status": "ready", "default_model": alias})
            return
        if not self._guard.is_client(scope["headers"]):
            reason = f"model '{alias}' has no upstream that can serve now (send a client key for details)"
        elif not self._may_use(scope, alias):  # a key limited to other models: no details either
            reason = f"model '{alias}' has no upstream that can serve now"
        await send_json(send, 503, {"status": "not_ready", "default_model": alias, "reason": reason})

    async def models(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The OpenAI model list of the aliases that can serve now, and why the others cannot."""
        kid = self._guard.client(scope["headers"])
        data: list[dict[str, Any]] = []
        unavailable: list[str] = []
        aliases: dict[str, dict[str, Any]] = {}
        for alias, route in self._routes.items():
            if not self._inference.may_use(kid, alias):
                continue  # a key limited to some models sees only those
            name = self._settings.advertised_name(alias)
            ok, reason = route.available()
            info: dict[str, Any] = {"id": name, "available": ok, **route.describe()}
            if ok:
                data.append(self._model_object(name, route))
            else:
                info["reason"] = reason
                unavailable.append(name)
            aliases[alias] = info
        body = {
            "object": "list",
            "data": data,
            "rolemesh": {"unavailable_models": unavailable, "aliases": aliases},
        }
        await send_json(send, 200, body)

    async def model(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``GET /v1/models/{id}`` (what ``client.models.retrieve`` calls)."""
        kid = self._guard.client(scope["headers"])
        name = scope["path"][len(MODELS_PREFIX) :]
        alias = self._inference.resolve(name)
        if alias is None or not self._inference.may_use(kid, alias):
            raise ModelNotFound(f"model '{name}' does not exist", param="model")
        route = self._routes[alias]
        ok, reason = route.available()
        if not ok:  # it exists: say why it cannot serve, as a chat call to it would
            raise NoUpstreamAvailable(f"model '{name}' cannot serve now: {reason}")
        await send_json(send, 200, self._model_object(self._settings.advertised_name(alias), route))

    def _may_use(self, scope: Scope, alias: str) -> bool:
        try:
            kid = self._guard.client(scope["headers"])
        except RoleMeshError:
            return False
        return self._inference.may_use(kid, alias)

    def _model_object(self, name: str, route: Route) -> dict[str, Any]:
        """An OpenAI model object, plus what the backend reports about its model."""
        obj: dict[str, Any] = {
            "id": name,
            "object": "model",
            "created": self._created,
            "owned_by": "rolemesh",
        }
        obj.update(route.model_info() or {})  # after: what we set comes first; it has none of those keys
        if route.cold():  # it can serve, after its model loads
            obj["cold"] = True
        return obj
