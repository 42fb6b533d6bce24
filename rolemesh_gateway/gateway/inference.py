"""The routed endpoints: read ``model``, pick the alias's route, build the outbound request.

Every llama-server endpoint a client uses (:data:`~rolemesh_gateway.common.endpoints.ROUTED`:
OpenAI chat, completions, embeddings and Responses, Anthropic Messages, rerank, infill,
tokenize...) is served here, routed by its ``model`` (the default alias without one).

This is the hot path, kept thin: one header scan for the key, the body read against the limit
and parsed once, only ``model`` looked at (no validation of chat bodies), the body re-dumped
only when the route rewrites ``model``, and one list of upstream headers built.
"""

from __future__ import annotations

import itertools
import os
from urllib.parse import parse_qsl, urlencode

import orjson

from ..common.asgi import Headers, Receive, Scope, Send, cancel_on_disconnect, read_json_object
from ..common.endpoints import Endpoint
from ..common.errors import BadRequest, LoopDetected, ModelNotFound
from ..common.relay import upstream_headers
from .guard import Guard
from .routes import Outbound, Route
from .settings import Settings

#: A client's X-Request-Id longer than this is replaced by one of ours.
MAX_REQUEST_ID = 200
#: Every request this gateway forwards carries its id here; one that comes back is a loop.
VIA = b"x-rolemesh-via"


class Inference:
    """Resolves model names and builds what goes upstream; :meth:`handler` serves one endpoint."""

    def __init__(self, settings: Settings, routes: dict[str, Route], guard: Guard) -> None:
        self._routes = routes
        self._guard = guard
        self._default = settings.default_alias
        self._max_body = settings.limits.max_body_bytes
        #: Every name a client may use for an alias (its key and its openai_model_name).
        self._names = {
            name: alias for alias in settings.models for name in (alias, settings.advertised_name(alias))
        }
        # Request ids: a random per-process prefix and a counter (unique, far cheaper than uuid4).
        self._rid_prefix = os.urandom(6).hex().encode() + b"-"
        self._rid_counter = itertools.count(1)
        #: This gateway's name in ``x-rolemesh-via`` (random per process).
        self._via = b"rolemesh-" + os.urandom(4).hex().encode()

    def resolve(self, name: str) -> str | None:
        """The alias a client means by ``name``, if any."""
        return self._names.get(name)

    def handler(self, endpoint: Endpoint) -> EndpointHandler:
        return EndpointHandler(self, endpoint)

    def route_for(self, model: object) -> Route:
        """The route for a request's ``model`` (None: the default alias)."""
        if model is None:
            return self._routes[self._default]
        if type(model) is not str:
            raise BadRequest("'model' must be a string", param="model")
        alias = self._names.get(model)
        if alias is None:
            raise ModelNotFound(
                f"model '{model}' does not exist; configured: {', '.join(self._routes)}", param="model"
            )
        return self._routes[alias]

    def outbound(self, method: str, target: str, headers: Headers, body: bytes, anthropic: bool) -> Outbound:
        """What goes upstream: the client's headers cleaned, a request id both ways, and our name
        in ``x-rolemesh-via`` (a request that already carries it has looped back: refused)."""
        rid = via = None
        for k, v in headers:
            if k == b"x-request-id":
                rid = v
            elif k == VIA:
                via = v
        extra = [(VIA, via + b", " + self._via if via else self._via)]
        if via is not None:
            if self._via in via:
                raise LoopDetected(
                    "this request has already passed through this gateway (a node points back at it?)"
                )
            headers = [h for h in headers if h[0] != VIA]
        if rid is not None and len(rid) <= MAX_REQUEST_ID:
            out = upstream_headers(headers, extra)  # the client's id passes through
        else:
            if rid is not None:  # absurdly long: replace it
                headers = [h for h in headers if h[0] != b"x-request-id"]
            rid = b"%s%x" % (self._rid_prefix, next(self._rid_counter))
            out = upstream_headers(headers, [(b"x-request-id", rid), *extra])
        return Outbound(method, target, out, body, [(b"x-request-id", rid)], anthropic)


class EndpointHandler:
    """One routed endpoint as an ASGI handler."""

    __slots__ = ("_anthropic", "_endpoint", "_inference")

    def __init__(self, inference: Inference, endpoint: Endpoint) -> None:
        self._inference = inference
        self._endpoint = endpoint
        self._anthropic = endpoint.dialect == "anthropic"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        inference = self._inference
        endpoint = self._endpoint
        headers: Headers = scope["headers"]
        inference._guard.client(headers)
        query: bytes = scope.get("query_string", b"")
        if endpoint.model_in == "body":
            body, data = await read_json_object(receive, headers, inference._max_body)
            model = data.get("model")
            route = inference.route_for(model)
            if route.rewrite_model is not None and model != route.rewrite_model:
                data["model"] = route.rewrite_model
                body = orjson.dumps(data)
            target = endpoint.upstream_path
            if query:
                target = f"{target}?{query.decode('latin-1')}"
        else:  # GET /props?model=...: no body; the model travels in the query
            body = b""
            params = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
            model = next((v for k, v in params if k == "model"), None)
            route = inference.route_for(model)
            if route.rewrite_model is not None:
                params = [(k, route.rewrite_model if k == "model" else v) for k, v in params]
                if model is None:
                    params.append(("model", route.rewrite_model))
            target = f"{endpoint.upstream_path}?{urlencode(params)}" if params else endpoint.upstream_path
        out = inference.outbound(endpoint.method, target, headers, body, self._anthropic)
        await cancel_on_disconnect(receive, route.forward(out, send))
