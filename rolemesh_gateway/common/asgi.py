"""Small ASGI helpers shared by the gateway and the node agent (kept thin: hot path).

Both apps are plain ASGI callables: a :class:`Dispatcher` finds the handler for a method and
path, the request readers turn oversized or malformed bodies into our errors, and the
senders write JSON answers and OpenAI-shaped errors.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from .errors import BadRequest, InvalidJSON, MethodNotAllowed, NotFound, PayloadTooLarge, RoleMeshError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON_HEADERS: Headers = [(b"content-type", b"application/json")]


class Dispatcher:
    """Method and path to handler: exact paths in a dict (the hot path), then prefixes."""

    def __init__(self) -> None:
        self._exact: dict[str, dict[str, Handler]] = {}
        self._prefixes: list[tuple[str, dict[str, Handler]]] = []

    def add(self, method: str, path: str, handler: Handler) -> None:
        self._exact.setdefault(path, {})[method] = handler

    def add_prefix(self, method: str, prefix: str, handler: Handler) -> None:
        """``prefix`` matches any longer path that starts with it (``/v1/nodes/`` + an id)."""
        for known, methods in self._prefixes:
            if known == prefix:
                methods[method] = handler
                return
        self._prefixes.append((prefix, {method: handler}))

    def find(self, method: str, path: str) -> Handler:
        methods = self._exact.get(path)
        if methods is None:
            methods = next((m for p, m in self._prefixes if path.startswith(p) and len(path) > len(p)), None)
            if methods is None:
                raise NotFound(f"no such endpoint: {method} {path}")
        handler = methods.get(method)
        if handler is None:
            raise MethodNotAllowed(f"{path} accepts {', '.join(methods)}, not {method}")
        return handler


def raw_target(scope: Scope) -> str:
    """The path as the client sent it (still percent-encoded) with its query: what a proxy forwards.

    Refused (400): a path whose decoded form holds control characters or dot segments, which
    a lenient server behind us might read as another request or another file.
    """
    path: str = scope["path"]
    if any(c < " " or c == "\x7f" for c in path):
        raise BadRequest("the request path contains control characters")
    if any(seg in (".", "..") for seg in path.split("/")):
        raise BadRequest("the request path contains '.' or '..' segments")
    raw: bytes = scope.get("raw_path") or path.encode("ascii", "strict")
    query: bytes = scope.get("query_string", b"")
    target = raw.decode("ascii")
    return f"{target}?{query.decode('ascii')}" if query else target


def header(headers: Headers, name: bytes) -> bytes | None:
    """First value of a (lower-case) header name, or None."""
    for k, v in headers:
        if k == name:
            return v
    return None


async def read_body(receive: Receive, headers: Headers, limit: int) -> bytes:
    """Read the whole request body, refusing more than ``limit`` bytes.

    A declared ``Content-Length`` over the limit is refused before a single byte is read.
    """
    declared = header(headers, b"content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            size = -1
        if size > limit:
            raise PayloadTooLarge(
                f"request body of {size} bytes is over the limit of {limit} bytes (limits.max_body_bytes)"
            )
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        return bytes(body)
    parts = [body]
    total = len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":  # never forward a cut request as a whole one
            raise BadRequest("the client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


async def read_json_object(receive: Receive, headers: Headers, limit: int) -> tuple[bytes, dict[str, Any]]:
    """Read the body and parse it as a JSON object (400 for anything else); return both."""
    body = await read_body(receive, headers, limit)
    if body[:3] == b"\xef\xbb\xbf":  # a UTF-8 byte order mark: llama-server accepts it, so do we
        body = body[3:]
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"request body is not valid JSON: {exc}") from None
    if type(data) is not dict:
        raise BadRequest("request body must be a JSON object")
    return body, data


#: After start-up, move every object made so far (modules, config, routes, pools: they live until
#: exit) out of the collector's reach, so that the full collections a loaded server runs scan only
#: what requests made: a few µs per request and most of the p99 at 64 connections
#: (docs/benchmarks.md). The test suite turns it off: its in-process servers share pytest's process.
FREEZE_AT_STARTUP = True


async def lifespan(
    receive: Receive,
    send: Send,
    startup: Callable[[], Awaitable[None]],
    shutdown: Callable[[], Awaitable[None]],
) -> None:
    """Run the ASGI lifespan protocol around ``startup`` / ``shutdown``."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await startup()
            except Exception as exc:
                logging.getLogger("rolemesh").exception("start-up failed")
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            if FREEZE_AT_STARTUP:
                gc.freeze()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def send_bytes(send: Send, status: int, body: bytes, headers: Headers) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, data: object, headers: Headers | None = None) -> None:
    body = orjson.dumps(data)
    await send_bytes(send, status, body, JSON_HEADERS + (headers or []))


async def send_error(
    send: Send, exc: RoleMeshError, headers: Headers | None = None, *, anthropic: bool = False
) -> None:
    """An error answer: OpenAI-shaped (or Anthropic-shaped), with the headers its status asks for."""
    extra = list(headers or [])
    if exc.status == 401:
        extra.append((b"www-authenticate", b'Bearer realm="rolemesh"'))
    if exc.retry_after is not None:
        extra.append((b"retry-after", b"%d" % exc.retry_after))
    body = exc.anthropic_body() if anthropic else exc.body()
    await send_bytes(send, exc.status, body, JSON_HEADERS + extra)


def sse_error_event(exc: RoleMeshError, *, anthropic: bool = False) -> bytes:
    """An SSE event that clients raise as an API error when a stream breaks."""
    if anthropic:  # the Messages API's stream error event
        return b"event: error\ndata: " + exc.anthropic_body() + b"\n\n"
    return b"data: " + exc.body() + b"\n\n"


#: Requests that finish sooner than this never pay for a disconnect watcher (a task costs
#: ~10 us; a timer handle ~1 us). A disconnect before the watcher starts is not lost: the
#: server keeps it and the watcher sees it at once.
WATCH_AFTER_S = 0.05


async def cancel_on_disconnect(receive: Receive, work: Awaitable[object]) -> None:
    """Run ``work``; if the client hangs up first, cancel it (frees the upstream slot)."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    gone = False
    watcher: asyncio.Task[None] | None = None

    async def watch() -> None:
        nonlocal gone
        message = await receive()
        if message["type"] == "http.disconnect":
            gone = True
            task.cancel()

    def start_watching() -> None:
        nonlocal watcher
        watcher = loop.create_task(watch(), name="watch-client-disconnect")

    timer = loop.call_later(WATCH_AFTER_S, start_watching)
    try:
        await work
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:
            logging.getLogger("rolemesh").info("client disconnected; upstream request cancelled")
            return
        raise
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.cancel()
