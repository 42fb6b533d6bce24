"""The HTTP server side of both programs: uvicorn's httptools protocol, with client limits.

uvicorn alone lets a client hold a connection forever (no deadline for the request head) and
send an unbounded head (httptools keeps growing it, copying it on every packet). Both cost
nothing to an attacker and need no key. :func:`guarded_protocol` returns uvicorn's protocol
with what it lacks, for ``rolemesh-gateway`` and ``rolemesh-node-agent`` (the guide's bare
``uvicorn`` command cannot have it; the README says which uvicorn flags come closest):

- a deadline for each request head (``limits.head_timeout_s``), armed when the connection
  opens and when a new request on it begins; a trickled head is closed at the deadline;
- a cap on the bytes of a request head (``limits.max_head_bytes``), checked before the bytes
  reach the parser: 431 and the connection closed;
- a cap on open connections (``limits.max_connections``, and never more than half the file
  descriptors the process may open). At the cap, the connection that has waited longest for a
  request head (idle or trickling: never one with a request in progress) is closed to make
  room; only when none can go is the new one answered 503 and closed. So a flood of idle
  connections cannot lock out a client that sends a request.
- idle keep-alive connections close after ``limits.keepalive_s`` (uvicorn's own timer).

The write timeout for clients that stop reading a stream lives in the relay (it works under
any server): see :mod:`rolemesh_gateway.common.relay`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import resource
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .config import Limits
from .relay import CLIENT_ABORT

log = logging.getLogger("rolemesh.server")


def connection_cap(limits: Limits) -> int:
    """``limits.max_connections``, but never more than half the file descriptors we may open
    (every client connection may need an upstream one too, plus logs, pools, children)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return limits.max_connections
    return max(1, min(limits.max_connections, soft // 2))


def _answer(status: bytes, code: str, message: str, extra: bytes = b"") -> bytes:
    body = orjson.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "code": code, "param": None}}
    )
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\ncontent-type: application/json\r\n"
        + extra
        + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        + body
    )


class _Waiting:
    """The connections waiting for a request head, oldest first (who goes when we are full)."""

    def __init__(self) -> None:
        self._order: collections.OrderedDict[int, GuardedProtocol] = collections.OrderedDict()

    def add(self, conn: GuardedProtocol) -> None:
        self._order[id(conn)] = conn

    def discard(self, conn: GuardedProtocol) -> None:
        self._order.pop(id(conn), None)

    def oldest(self) -> GuardedProtocol | None:
        return next(iter(self._order.values()), None)


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head deadline, a head size cap and a connection cap."""

    limits: Limits = Limits()
    cap: int = 1024
    waiting: _Waiting = _Waiting()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._tail = b""
        self._in_head = False

    # -- connections ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        full = len(self.connections) >= self.cap
        super().connection_made(transport)
        if full:
            victim = self.waiting.oldest()
            if victim is None:  # everyone is busy with a request: this one cannot be served now
                transport.write(
                    _answer(
                        b"503 Service Unavailable",
                        "too_many_connections",
                        f"the server has {self.cap} connections open (limits.max_connections); retry soon",
                        b"retry-after: 1\r\n",
                    )
                )
                transport.close()
                return
            victim._close("the connection limit was reached and it had sent no request")
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        super().connection_lost(exc)

    # -- the request head ----------------------------------------------------------------------
    def _await_head(self) -> None:
        """A request head is due now: start its deadline and its byte count."""
        if self._in_head:
            return
        self._in_head = True
        self._head_bytes = 0
        self._tail = b""
        self.waiting.add(self)
        self._head_timer = self.loop.call_later(self.limits.head_timeout_s, self._head_timeout)

    def _head_done(self) -> None:
        self._in_head = False
        self.waiting.discard(self)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self._head_bytes:
            limit = self.limits.head_timeout_s
            message = f"the request head did not arrive within {limit:g}s (limits.head_timeout_s)"
            self.transport.write(_answer(b"408 Request Timeout", "request_timeout", message))
        self._close("no request head in time")

    def _close(self, why: str) -> None:
        self._head_done()
        if not self.transport.is_closing():
            log.debug("closing client connection %s: %s", self.client, why)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            seen = self._head_bytes + len(data)
            if seen > self.limits.max_head_bytes:
                # Allowed only if the head ends within the cap; the parser never sees more.
                window = self._tail + data
                end = window.find(b"\r\n\r\n")
                if end < 0 or self._head_bytes - len(self._tail) + end + 4 > self.limits.max_head_bytes:
                    message = (
                        f"the request head is over {self.limits.max_head_bytes} bytes (limits.max_head_bytes)"
                    )
                    self.transport.write(
                        _answer(b"431 Request Header Fields Too Large", "request_head_too_large", message)
                    )
                    self._close("request head too large")
                    return
            self._head_bytes = seen
            self._tail = data[-3:]
        super().data_received(data)

    # -- parser callbacks ----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._await_head()  # a next request on a kept-alive connection: a new deadline
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._head_done()
        CLIENT_ABORT.set(self.transport.abort)  # copied into the request's task, created next
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self.waiting.add(self)  # idle, waiting for the next request: first to go when full


def guarded_protocol(limits: Limits) -> type[GuardedProtocol]:
    """The protocol class for uvicorn's ``http=``, bound to ``limits`` (one per server)."""
    return type(
        "GuardedProtocol",
        (GuardedProtocol,),
        {"limits": limits, "cap": connection_cap(limits), "waiting": _Waiting()},
    )
