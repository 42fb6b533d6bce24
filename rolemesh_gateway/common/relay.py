"""Relaying an upstream's answer to an ASGI client, and the header hygiene both ways.

The wire work is in :mod:`~rolemesh_gateway.common.http1`. Here an answer is relayed: bodies
with a length in one piece, everything else (SSE, chunked, large) chunk by chunk as it
arrives. A failure after the head was sent cannot become an error answer any more: an SSE
stream ends with an error event, any other body is left unfinished, and
:class:`~rolemesh_gateway.common.errors.StreamBroken` tells the caller the client was told.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable

from .asgi import Headers, Send, sse_error_event
from .errors import ClientStalled, RoleMeshError, StreamBroken
from .http1 import Client, Response, Timeouts
from .protocol import NODE_KEY

log = logging.getLogger("rolemesh.upstream")

#: Hop-by-hop headers (RFC 9110 7.6.1) plus the ones the client library recomputes.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"expect",
    }
)
#: Never forwarded upstream: the client's (or the gateway's) credentials.
CREDENTIALS = frozenset({b"authorization", b"x-api-key", NODE_KEY})
_DROP_REQUEST = HOP_BY_HOP | CREDENTIALS
#: Never relayed back: hop-by-hop, and the upstream's CORS answer (the gateway's own
#: ``cors.allow_origins`` decides which browser origins may read an answer).
_DROP_RESPONSE = HOP_BY_HOP | {
    b"server",
    b"date",
    b"access-control-allow-origin",
    b"access-control-allow-credentials",
    b"access-control-allow-methods",
    b"access-control-allow-headers",
    b"access-control-expose-headers",
    b"access-control-max-age",
}

SSE_HEADERS: Headers = [(b"x-accel-buffering", b"no"), (b"cache-control", b"no-cache")]


def _connection_named(headers: Headers) -> frozenset[bytes]:
    """The header names a ``Connection`` header lists: hop-by-hop too (RFC 9110 7.6.1)."""
    named: set[bytes] = set()
    for k, v in headers:
        if k == b"connection":
            named.update(t.strip().lower() for t in v.split(b","))
    return frozenset(named)


def upstream_headers(client: Headers, extra: Headers, replace: tuple[bytes, ...] = ()) -> Headers:
    """The client's headers minus hop-by-hop, credentials and ``replace``, plus ``extra``."""
    drop = _DROP_REQUEST.union(replace) if replace else _DROP_REQUEST
    out = [(k, v) for k, v in client if k not in drop]
    if len(out) != len(client):  # something was dropped: maybe a Connection header naming others
        named = _connection_named(client)
        if named:
            out = [(k, v) for k, v in out if k not in named]
    out.extend(extra)
    return out


def response_headers(raw: Headers) -> Headers:
    """An upstream answer's headers (names already lower-case) minus hop-by-hop ones."""
    out = [(k, v) for k, v in raw if k not in _DROP_RESPONSE]
    if len(out) != len(raw):
        named = _connection_named(raw)
        if named:
            out = [(k, v) for k, v in out if k not in named]
    return out


#: The default of ``limits.write_timeout_s``: a stream whose client reads nothing this long ends.
WRITE_TIMEOUT_S = 60.0


#: Set by the server (:mod:`rolemesh_gateway.common.server`) for each request: aborts the
#: client's connection. A stalled stream ends with it, so the socket is freed at once (a plain
#: close would wait for the unread bytes to drain) and uvicorn sees a client that went away, not
#: an application that left its response unfinished. Unset under a bare ``uvicorn``.
CLIENT_ABORT: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "rolemesh_client_abort", default=None
)


class _StallWatch:
    """Notices a client that stopped reading a stream (its ``send`` blocks) and cancels the relay.

    One timer per stream, re-armed every half timeout, and two float writes per chunk: far
    cheaper than a timeout around every ``send``.
    """

    __slots__ = ("_handle", "_limit", "_loop", "_task", "sending_since", "stalled")

    def __init__(self, limit_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._limit = limit_s
        self.sending_since = 0.0
        self.stalled = False
        self._handle = self._loop.call_later(limit_s / 2, self._check)

    def _check(self) -> None:
        since = self.sending_since
        if since and self._loop.time() - since >= self._limit and self._task is not None:
            self.stalled = True
            self._task.cancel()
            return
        self._handle = self._loop.call_later(self._limit / 2, self._check)

    def stop(self) -> None:
        self._handle.cancel()


#: Bodies with a length up to this size are read whole before the client gets the head, so that
#: a failure while reading can still be answered cleanly (or retried on another node); larger
#: ones are relayed as they arrive, so that memory stays bounded whatever an upstream sends.
BUFFER_MAX = 4 * 1024 * 1024


def _is_streamed(resp: Response) -> bool:
    return (
        resp.content_type == "text/event-stream"
        or resp.content_length is None
        or resp.content_length > BUFFER_MAX
    )


def is_buffered(resp: Response) -> bool:
    """Will :func:`relay` read this answer whole before sending the head? (then so may a caller)"""
    return not _is_streamed(resp)


async def relay(
    resp: Response,
    send: Send,
    extra_headers: Headers,
    target: str,
    *,
    body: bytes | None = None,
    anthropic: bool = False,
    write_timeout_s: float = WRITE_TIMEOUT_S,
) -> int:
    """Relay an upstream response to the ASGI client; returns the bytes relayed.

    Errors before the head was sent propagate as RoleMeshError, so the caller can still answer
    or retry. After it, an SSE stream ends with an error event; any other body is left
    unfinished, and the server closes the connection, so that a client never takes a cut
    body for a whole one.
    """
    headers = response_headers(resp.headers)
    headers.extend(extra_headers)
    if not _is_streamed(resp):
        if body is None:  # else the caller read it already, to judge the answer
            body = await resp.read()
        headers.append((b"content-length", b"%d" % len(body)))
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return len(body)
    sse = resp.content_type == "text/event-stream"
    if sse:  # unless the upstream (llama-server, or an agent) already said so
        present = {name for name, _ in headers}
        headers.extend(h for h in SSE_HEADERS if h[0] not in present)
    if resp.content_length is not None and not sse:  # an SSE stream may end with our error event
        headers.append((b"content-length", b"%d" % resp.content_length))
    await send({"type": "http.response.start", "status": resp.status, "headers": headers})
    total = 0
    watch = _StallWatch(write_timeout_s)
    try:
        while chunk := await resp.next_chunk():
            total += len(chunk)
            watch.sending_since = watch._loop.time()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            watch.sending_since = 0.0
    except asyncio.CancelledError:
        if not watch.stalled:
            raise
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        log.warning(
            "client of %s read nothing for %gs (limits.write_timeout_s); stream ended after %d bytes",
            target,
            write_timeout_s,
            total,
        )
        abort = CLIENT_ABORT.get()
        if abort is not None:
            abort()
            await asyncio.sleep(0)  # the server learns of the lost connection before we return
        raise ClientStalled(target) from None
    except RoleMeshError as err:
        log.warning("stream from %s broke after %d bytes: %s", target, total, err.message)
        if sse:
            await send(
                {
                    "type": "http.response.body",
                    "body": sse_error_event(err, anthropic=anthropic),
                    "more_body": False,
                }
            )
        raise StreamBroken(err) from err
    finally:
        watch.stop()
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return total


async def pass_through(
    client: Client,
    method: str,
    url: str,
    headers: Headers,
    body: bytes,
    timeouts: Timeouts,
    send: Send,
    extra_headers: Headers,
    target: str,
    *,
    anthropic: bool = False,
    write_timeout_s: float = WRITE_TIMEOUT_S,
) -> str:
    """One exchange relayed as it comes: open, relay, release (no retry, no judgement).

    Returns how it went, in the words of ``rolemesh_upstream_attempts_total``: ``ok``,
    ``http_error`` (a 5xx answer, relayed) or ``broken`` (failed after the head); failures
    before anything was sent are raised.
    """
    resp = await client.open(method, url, headers, body, timeouts, target)
    try:
        await relay(resp, send, extra_headers, target, anthropic=anthropic, write_timeout_s=write_timeout_s)
    except StreamBroken:
        return "broken"  # the client was told in-band; relay logged it
    except ClientStalled:
        return "ok"  # the client stopped reading; nothing wrong upstream
    finally:
        resp.release()
    return "http_error" if resp.status >= 500 else "ok"
