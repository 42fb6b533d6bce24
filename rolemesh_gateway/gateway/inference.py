"""The inference endpoints: read ``model``, pick the alias's route, build the outbound request.

This is the hot path, kept thin: one header scan for the key, the body read against the limit
and parsed once, only ``model`` looked at (no validation of chat bodies), the body re-dumped
only when the route rewrites ``model``, and one list of upstream headers built.
"""

from __future__ import annotations

import itertools
import os

import orjson

from ..common.asgi import Headers, Receive, Scope, Send, cancel_on_disconnect, read_json_object, target_of
from ..common.errors import BadRequest, ModelNotFound
from ..common.relay import upstream_headers
from .guard import Guard
from .routes import Outbound, Route
from .settings import Settings

#: The paths served here (POST), routed by the body's ``model``.
INFERENCE_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
#: A client's X-Request-Id longer than this is replaced by one of ours.
MAX_REQUEST_ID = 200


class Inference:
    """``POST`` of an inference path: auth, route by ``model``, forward."""

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

    def resolve(self, name: str) -> str | None:
        """The alias a client means by ``name``, if any."""
        return self._names.get(name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: Headers = scope["headers"]
        self._guard.client(headers)
        body, data = await read_json_object(receive, headers, self._max_body)
        model = data.get("model")
        if model is None:
            alias = self._default
        elif type(model) is not str:
            raise BadRequest("'model' must be a string", param="model")
        else:
            found = self._names.get(model)
            if found is None:
                raise ModelNotFound(
                    f"model '{model}' does not exist; configured: {', '.join(self._routes)}",
                    param="model",
                )
            alias = found
        route = self._routes[alias]
        if route.rewrite_model is not None and model != route.rewrite_model:
            data["model"] = route.rewrite_model
            body = orjson.dumps(data)
        out = self._outbound(scope["method"], target_of(scope), headers, body)
        await cancel_on_disconnect(receive, route.forward(out, send))

    def _outbound(self, method: str, target: str, headers: Headers, body: bytes) -> Outbound:
        """What goes upstream: the client's headers cleaned, and a request id both ways."""
        rid = None
        for k, v in headers:
            if k == b"x-request-id":
                rid = v
                break
        if rid is not None and len(rid) <= MAX_REQUEST_ID:
            out = upstream_headers(headers, [])  # the client's id passes through
        else:
            if rid is not None:  # absurdly long: replace it
                headers = [h for h in headers if h[0] != b"x-request-id"]
            rid = b"%s%x" % (self._rid_prefix, next(self._rid_counter))
            out = upstream_headers(headers, [(b"x-request-id", rid)])
        return Outbound(method, target, out, body, [(b"x-request-id", rid)])
