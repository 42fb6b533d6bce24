"""Fallbacks between aliases (``models.<alias>.fallbacks``): another alias serves a request that
the one asked for cannot.

A request moves on to the next alias of the chain (:meth:`Settings.fallback_chain`) only while
nothing has reached the client: when the route raises before answering (no node or upstream
available, queue full or timed out, every attempt failed), or when its answer is one the next
alias may do better with: a 400 saying the prompt is longer than the model's context
(llama-server's ``exceed_context_size_error``, OpenAI's ``context_length_exceeded``) or a
502/503/504. To see those before the client does, the answer's head is held back (:class:`Peek`)
until its body is known; a held answer of another kind goes on unchanged. A stream that breaks
after its first byte is never retried: the route has told the client in-band by then.

The last alias of the chain answers as it would without fallbacks. Aliases without fallbacks
never come here: their requests cost nothing more.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from urllib.parse import parse_qsl, urlencode

import orjson

from ..common.asgi import Message, Send
from ..common.errors import NoUpstreamAvailable, QueueFull, QueueTimeout, RoleMeshError, UpstreamError
from .metrics import Stats
from .routes import NODE_UNWELL, Outbound, Route

log = logging.getLogger("rolemesh.fallbacks")

#: The header that says which alias served an answer (on every answer an alias relays).
ALIAS_HEADER = b"x-rolemesh-alias"
#: What a too-long prompt's 400 carries: llama-server's error type, OpenAI's (and vLLM's) code.
CONTEXT_ERRORS = (b"exceed_context_size_error", b"context_length_exceeded")


class Declined(Exception):
    """An answer held back by :class:`Peek` that the next alias should have a go at."""

    def __init__(self, reason: str, status: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class Peek:
    """``send`` that holds back a 400 or 502/503/504 head until its body shows what it is."""

    __slots__ = ("_held", "_open", "_send")

    def __init__(self, send: Send) -> None:
        self._send = send
        self._held: Message | None = None
        self._open = False

    async def __call__(self, message: Message) -> None:
        if self._open:
            await self._send(message)
            return
        held = self._held
        if held is None:
            if message["type"] == "http.response.start":
                status = message["status"]
                if status == 400 or status in NODE_UNWELL:
                    self._held = message
                    return
            self._open = True
            await self._send(message)
            return
        status = held["status"]
        if status in NODE_UNWELL:
            raise Declined("unavailable", status)
        body = message.get("body", b"")
        if not message.get("more_body") and any(e in body for e in CONTEXT_ERRORS):
            raise Declined("context_too_long", status)
        self._open = True
        self._held = None
        await self._send(held)
        await self._send(message)


def reason_of(exc: RoleMeshError) -> str:
    """The ``reason`` label of ``rolemesh_fallbacks_total`` for a route's failure."""
    if isinstance(exc, QueueFull):
        return "queue_full"
    if isinstance(exc, QueueTimeout):
        return "queue_timeout"
    if isinstance(exc, NoUpstreamAvailable):
        return "no_upstream"
    return "upstream_failed"


def retarget(out: Outbound, model: str, alias: str) -> Outbound:
    """``out`` for another alias: ``model`` rewritten (body or query), that alias's header."""
    target, body = out.target, out.body
    if body:
        data = orjson.loads(body)
        data["model"] = model
        body = orjson.dumps(data)
    else:  # GET /props?model=...
        path, _, query = target.partition("?")
        params = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "model"]
        target = f"{path}?{urlencode([*params, ('model', model)])}"
    return dataclasses.replace(out, target=target, body=body, reply_headers=[(ALIAS_HEADER, alias.encode())])


async def serve(
    first: Route,
    chain: tuple[str, ...],
    routes: Mapping[str, Route],
    models: Mapping[str, str],
    out: Outbound,
    send: Send,
    stats: Stats,
) -> None:
    """Forward ``out`` on ``first``, then on each alias of ``chain`` while nothing was sent.

    ``models`` gives, per alias, the ``model`` its upstream is sent.
    """
    route = first
    for nxt in chain:
        try:
            await route.forward(out, Peek(send))
            return
        except Declined as exc:
            reason, why = exc.reason, f"answered HTTP {exc.status} ({exc.reason})"
        except (NoUpstreamAvailable, UpstreamError) as exc:
            reason, why = reason_of(exc), exc.message
        stats.fallbacks[(route.alias, nxt, reason)] += 1
        log.info("model '%s' could not serve the request (%s); trying '%s'", route.alias, why, nxt)
        route = routes[nxt]
        out = retarget(out, models[nxt], nxt)
    await route.forward(out, send)
