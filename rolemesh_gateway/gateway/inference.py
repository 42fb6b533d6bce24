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
import logging
import os
import re
import time
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson

from ..common.asgi import Headers, Message, Receive, Scope, Send, cancel_on_disconnect, read_json_object
from ..common.endpoints import Endpoint
from ..common.errors import BadRequest, LoopDetected, ModelNotFound, RateLimited, RoleMeshError
from ..common.logs import RequestLog, current_request
from ..common.relay import upstream_headers
from . import fallbacks
from .guard import Guard
from .limits import MODELS, ClientLimits, ClientPolicy, Ticket, ask_usage, client_policies
from .metrics import UNKNOWN, Stats
from .routes import Outbound, Route
from .settings import Settings

#: The ``error`` of a request refused by its key's own limits (not shown as a fleet error).
LIMITED = "over the client key's own limit"
#: A client's X-Request-Id longer than this is replaced by one of ours.
MAX_REQUEST_ID = 200
#: Every request this gateway forwards carries its id here; one that comes back is a loop.
VIA = b"x-rolemesh-via"


class Inference:
    """Resolves model names and builds what goes upstream; :meth:`handler` serves one endpoint."""

    def __init__(
        self,
        settings: Settings,
        routes: dict[str, Route],
        guard: Guard,
        stats: Stats,
        access_log: bool = False,
        on_error: Callable[[str, str, str | None, int, str], None] | None = None,
        limits: ClientLimits | None = None,
    ) -> None:
        self._routes = routes
        self._guard = guard
        self.stats = stats
        #: Told of every 5xx and 429 a client gets: request id, alias, node, status, message.
        self.on_error = on_error
        #: One log line per request (``--access-log``).
        self.access_log = access_log
        self._default = settings.default_alias
        self._max_body = settings.limits.max_body_bytes
        #: Every name a client may use for an alias (its key and its openai_model_name).
        self._names = {
            name: alias for alias in settings.models for name in (alias, settings.advertised_name(alias))
        }
        #: Per alias: the header naming it on its answers, and its fallback chain (if any).
        self._alias_header = {alias: (fallbacks.ALIAS_HEADER, alias.encode()) for alias in settings.models}
        self._fallbacks = {a: c for a in settings.models if (c := settings.fallback_chain(a))}
        self._upstream_model = {
            a: routes[a].rewrite_model or settings.advertised_name(a) for a in settings.models
        }
        #: The named client keys with limits or model access, by key id; the others have none.
        self.policies = client_policies(settings)
        #: Counts the requests of limited keys (kept by the gateway across reloads).
        self.limits = limits or ClientLimits(stats)
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

    def forward(
        self, route: Route, out: Outbound, send: Send, policy: ClientPolicy | None = None
    ) -> Coroutine[Any, Any, None]:
        """``route.forward``, or through the alias's fallbacks when it has some.

        A client key with its own ``models`` is only ever served by those: the aliases of the
        chain it may not use are left out.
        """
        chain = self._fallbacks.get(route.alias)
        if chain is not None and policy is not None and policy.models is not None:
            allowed = policy.models
            chain = tuple(a for a in chain if a in allowed) or None
        if chain is None:
            return route.forward(out, send)
        routes, models = self._routes, self._upstream_model
        return fallbacks.serve(route, chain, routes, models, out, send, self.stats)

    def for_client(self, model: object, policy: ClientPolicy) -> Route:
        """:meth:`route_for` for a key with its own ``models``: the others answer as if absent."""
        if policy.models is None:
            return self.route_for(model)
        if model is None:
            return self._routes[policy.default]
        alias = self._names.get(model) if type(model) is str else None
        if alias is None or alias not in policy.models:
            if alias is not None:
                self.stats.client_rejected[(policy.name, MODELS)] += 1
            if type(model) is not str:
                raise BadRequest("'model' must be a string", param="model")
            raise ModelNotFound(
                f"model '{model}' does not exist; configured: {', '.join(policy.listed)}", param="model"
            )
        return self._routes[alias]

    def may_use(self, kid: str | None, alias: str) -> bool:
        """May the client key with this id see and use this alias?"""
        policy = self.policies.get(kid)
        return policy is None or policy.models is None or alias in policy.models

    def outbound(
        self, method: str, target: str, headers: Headers, body: bytes, anthropic: bool, rid: bytes
    ) -> Outbound:
        """What goes upstream: the client's headers cleaned, the request id, and our name in
        ``x-rolemesh-via`` (a request that already carries it has looped back: refused)."""
        via = None
        for k, v in headers:
            if k == VIA:
                via = v
                break
        extra = [(b"x-request-id", rid), (VIA, via + b", " + self._via if via else self._via)]
        if via is not None and self._via in via:
            raise LoopDetected(
                "this request has already passed through this gateway (a node points back at it?)"
            )
        drop = (b"x-request-id", VIA)
        return Outbound(method, target, upstream_headers(headers, extra, drop), body, [], anthropic)

    def request_id(self, headers: Headers) -> bytes:
        """The client's ``X-Request-Id`` when it is short and printable; else a new one."""
        for k, v in headers:
            if k == b"x-request-id":
                if 0 < len(v) <= MAX_REQUEST_ID and v.isascii() and v.decode("ascii").isprintable():
                    return v
                break
        return b"%s%x" % (self._rid_prefix, next(self._rid_counter))


class Watch:
    """The client's ``send``, seen on its way: status, first content, token usage."""

    __slots__ = ("_limits", "_rid", "_send", "cache", "first_at", "status", "stream", "ticket", "usage")

    def __init__(self, send: Send, rid: bytes) -> None:
        self._send = send
        self._rid = rid
        self.status = 0
        self.stream = False
        self.first_at: float | None = None
        self.usage: tuple[int, int] | None = None
        #: A limited key's admission, released as the answer's last part goes out.
        self.ticket: Ticket | None = None
        self._limits: ClientLimits | None = None
        #: Prompt tokens the server took from its cache, and those it processed.
        self.cache: tuple[int, int] | None = None

    def until_end(self, limits: ClientLimits, ticket: Ticket) -> None:
        """Release the ticket of a limited key as the answer's last part goes out, so that a
        client that goes on the moment an answer ends finds its place free (on every gateway)."""
        self._limits, self.ticket = limits, ticket

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            headers = message["headers"]
            for k, v in headers:
                if k == b"content-type":
                    self.stream = v.startswith(b"text/event-stream")
            headers.append((b"x-request-id", self._rid))
        else:
            body = message.get("body", b"")
            if body:
                if self.stream:
                    if self.first_at is None and _CONTENT.search(body):
                        self.first_at = time.perf_counter()
                    if b'"usage"' in body or b'"timings"' in body:
                        self._events_usage(body)
                elif b'"usage"' in body or b'"timings"' in body:
                    self._take_usage(_json(body))
            if self.ticket is not None and self._limits is not None:
                await self._limits.on_body(self.ticket, message, self.usage)
        await self._send(message)

    def _events_usage(self, body: bytes) -> None:
        for line in body.split(b"\n"):
            if line.startswith(b"data:") and (b'"usage"' in line or b'"timings"' in line):
                self._take_usage(_json(line[5:].strip()))

    def _take_usage(self, data: object) -> None:
        """Usage as OpenAI (prompt/completion_tokens) or Anthropic and Responses (input/output)
        write it; a later report replaces an earlier one (a stream may repeat it)."""
        if not isinstance(data, dict):
            return
        timings = data.get("timings")
        if isinstance(timings, dict):  # llama-server: exact, and on its native endpoints too
            cached, processed = timings.get("cache_n"), timings.get("prompt_n")
            if type(cached) is int and type(processed) is int:
                self.cache = (cached, processed)
        for where in (data, data.get("message"), data.get("response")):
            usage = where.get("usage") if isinstance(where, dict) else None
            if not isinstance(usage, dict):
                continue
            prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
            completion = usage.get("completion_tokens", usage.get("output_tokens"))
            old = self.usage or (0, 0)
            self.usage = (
                prompt if type(prompt) is int else old[0],
                completion if type(completion) is int else old[1],
            )
            if not isinstance(timings, dict):
                self._take_cached(usage)

    def _take_cached(self, usage: dict[str, Any]) -> None:
        """Cached prompt tokens as OpenAI (``prompt_tokens_details.cached_tokens``, included in
        ``prompt_tokens``) or Anthropic (``cache_read_input_tokens``, beside ``input_tokens``)
        report them."""
        if (
            "prompt_tokens_details" not in usage
            and "cache_read_input_tokens" not in usage
            and "input_tokens_details" not in usage
        ):
            return  # plain usage: nothing said about the cache
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        if type(cached) is int and type(prompt) is int:
            self.cache = (cached, max(prompt - cached, 0))
            return
        cached = usage.get("cache_read_input_tokens")
        if type(cached) is int and type(prompt) is int:
            self.cache = (cached, prompt)


#: The first SSE event that carries content: chat and completions text, Anthropic text deltas.
_CONTENT = re.compile(rb'"(?:content|text)":\s*"[^"]')


def _json(raw: bytes) -> object:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


class EndpointHandler:
    """One routed endpoint as an ASGI handler: route by ``model``, forward, count."""

    __slots__ = ("_anthropic", "_endpoint", "_inference")

    def __init__(self, inference: Inference, endpoint: Endpoint) -> None:
        self._inference = inference
        self._endpoint = endpoint
        self._anthropic = endpoint.dialect == "anthropic"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        inference = self._inference
        endpoint = self._endpoint
        started = time.perf_counter()
        headers: Headers = scope["headers"]
        rid = scope.get("rolemesh.request_id") or inference.request_id(headers)
        watch = Watch(send, rid)
        alias = UNKNOWN
        client = "anonymous"
        status = 500
        error = ""
        stats = inference.stats
        req = current_request.get()
        try:
            kid = inference._guard.client(headers)
            client = inference._guard.clients.name(kid)
            policy = inference.policies.get(kid)
            if req is not None:
                req.client = client
            query: bytes = scope.get("query_string", b"")
            if endpoint.model_in == "body":
                body, data = await read_json_object(receive, headers, inference._max_body)
                model = data.get("model")
                route = inference.route_for(model) if policy is None else inference.for_client(model, policy)
                if route.rewrite_model is not None and model != route.rewrite_model:
                    data["model"] = route.rewrite_model
                    body = orjson.dumps(data)
                target = endpoint.upstream_path
                if policy is not None and policy.tokens_per_minute and ask_usage(target, data):
                    body = orjson.dumps(data)
                if query:
                    target = f"{target}?{query.decode('latin-1')}"
            else:  # GET /props?model=...: no body; the model travels in the query
                body = b""
                data = None
                params = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
                model = next((v for k, v in params if k == "model"), None)
                route = inference.route_for(model) if policy is None else inference.for_client(model, policy)
                if route.rewrite_model is not None:
                    params = [(k, route.rewrite_model if k == "model" else v) for k, v in params]
                    if model is None:
                        params.append(("model", route.rewrite_model))
                target = f"{endpoint.upstream_path}?{urlencode(params)}" if params else endpoint.upstream_path
            alias = route.alias
            if req is not None:
                req.alias = alias
            out = inference.outbound(endpoint.method, target, headers, body, self._anthropic, rid)
            out.reply_headers.append(inference._alias_header[alias])
            ticket: Ticket | None = None
            if policy is not None and policy.limited:
                ticket = await inference.limits.admit(policy)  # else 429
                watch.until_end(inference.limits, ticket)
            if route.reads_body:
                out.data = data
            stats.inflight[alias] += 1
            try:
                await cancel_on_disconnect(receive, inference.forward(route, out, watch, policy))
            finally:
                stats.inflight[alias] -= 1
                if ticket is not None:
                    await inference.limits.release(ticket, watch.usage)
            status = watch.status or 499  # 499: the client left before an answer
        except RateLimited:
            # The key's own limit: counted by key in the metrics, not an error of the fleet.
            status = 429
            error = LIMITED
            raise
        except RoleMeshError as exc:
            status = exc.status
            error = exc.message
            raise
        finally:
            if (status >= 500 or status == 429) and error is not LIMITED and inference.on_error is not None:
                inference.on_error(
                    rid.decode("ascii"),
                    alias,
                    req.node if req is not None else None,
                    status,
                    error or f"the upstream answered HTTP {status}",
                )
            seconds = time.perf_counter() - started
            ttft = watch.first_at - started if watch.first_at is not None else None
            stats.finished(alias, endpoint.path, status, seconds, client, ttft, watch.usage)
            if watch.cache is not None:
                stats.prompt_cache(alias, watch.cache)
            if inference.access_log:
                _access(req, endpoint, status, seconds, ttft, watch.usage)


access_log = logging.getLogger("rolemesh.access")


def _access(
    req: RequestLog | None,
    endpoint: Endpoint,
    status: int,
    seconds: float,
    ttft: float | None,
    usage: tuple[int, int] | None,
) -> None:
    """One line per request (``--access-log``): fields as ``extra`` for the JSON format."""
    fields = {
        "endpoint": endpoint.path,
        "status": status,
        "duration_ms": round(seconds * 1000, 3),
        "ttft_ms": round(ttft * 1000, 3) if ttft is not None else None,
        "prompt_tokens": usage[0] if usage else None,
        "completion_tokens": usage[1] if usage else None,
    }
    access_log.info(
        "%s %s %d %.1fms client=%s alias=%s node=%s",
        endpoint.method,
        endpoint.path,
        status,
        seconds * 1000,
        req.client if req else None,
        req.alias if req else None,
        req.node if req else None,
        extra=fields,
    )
