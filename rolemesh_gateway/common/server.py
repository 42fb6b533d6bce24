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
import ssl
from typing import Any, cast

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .config import Limits
from .http1 import tls_reason as reason
from .relay import CLIENT_ABORT
from .tls import tls_extension

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


class _TlsGuardedProtocol(GuardedProtocol):
    """The same protocol on a TLS connection: each request's scope carries the ASGI ``tls``
    extension (the client's certificate, if any), made once per connection."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._tls = {"tls": tls_extension(transport.get_extra_info("ssl_object"))}
        super().connection_made(transport)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = self._tls  # type: ignore[typeddict-item]


class TlsHandshake(asyncio.Protocol):
    """What uvicorn gets as its protocol when serving HTTPS: the TLS handshake, then the HTTP.

    The server listens without TLS; each accepted connection gets the event loop's own TLS
    protocol (uvloop's, or asyncio's) put in front of the HTTP protocol here, before a byte is
    read, exactly as ``create_server(ssl=...)`` would do it, but with the handshake's outcome in
    our hands: a refused handshake is logged with the peer and the reason (unknown CA, expired,
    plain HTTP on this port), which the event loop itself only does in debug mode. The
    handshake must end within ``limits.head_timeout_s``, and handshakes in progress count
    against the connection cap: at the cap the oldest of them is closed to make room (as a
    connection that sends no request is), so a flood of silent connections cannot lock out a
    client.
    """

    protocol: type[GuardedProtocol] = _TlsGuardedProtocol
    context: ssl.SSLContext
    #: Connections in their handshake, oldest first (like those waiting for a request head,
    #: the first to go when the connection cap is reached).
    handshaking: collections.OrderedDict[asyncio.Future[None], asyncio.Transport] = collections.OrderedDict()

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raw = cast(asyncio.Transport, transport)
        inner = self.protocol(**self._kwargs)
        peer = _address(raw.get_extra_info("peername"))
        if len(inner.connections) + len(self.handshaking) >= inner.cap and not self._make_room(inner):
            log.warning("refusing a TLS connection from %s: %d connections open", peer, inner.cap)
            raw.abort()
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        tls = _ssl_protocol(loop)(
            loop,
            inner,
            self.context,
            waiter,
            server_side=True,
            call_connection_made=True,  # the HTTP protocol starts once the handshake is done
            ssl_handshake_timeout=inner.limits.head_timeout_s,
        )
        # Reading starts after this method returns: every byte goes to the TLS protocol.
        raw.set_protocol(tls)
        seen = _Handshaking(raw)
        tls.connection_made(seen)  # makes the connection's SSLObject (ours, see _AlertKeeper) now
        seen.sslobj, _AlertKeeper.last = _AlertKeeper.last, None
        handshaking = self.handshaking
        handshaking[waiter] = raw

        def done(w: asyncio.Future[None]) -> None:
            handshaking.pop(w, None)
            seen.handshaking = False
            exc = None if w.cancelled() else w.exception()
            if exc is not None:
                _log_refusal(peer, exc)

        waiter.add_done_callback(done)

    def _make_room(self, inner: GuardedProtocol) -> bool:
        """At the cap: close the oldest connection still in its handshake, else the one that has
        waited longest for a request head; False if every connection is busy with a request."""
        if self.handshaking:
            _, raw = self.handshaking.popitem(last=False)
            raw.abort()
            return True
        victim = inner.waiting.oldest()
        if victim is None:
            return False
        victim._close("the connection limit was reached and it had sent no request")
        return True


class _Handshaking:
    """The accepted connection as the TLS protocol sees it, with one change while it handshakes.

    When the handshake is refused, the TLS protocol aborts the connection. With bytes from the
    client still unread (the rest of its flight) the kernel then sends a reset, which can
    destroy the TLS alert before the client reads it: the client would see "connection reset"
    instead of "unknown ca". So a refused handshake ends gracefully here: the alert goes out,
    our side shuts, and what the client still sends is dropped until it closes (1 s at most).
    The methods the TLS protocol calls are the transport's own (no extra call per write).
    """

    __slots__ = (
        "_raw",
        "close",
        "get_extra_info",
        "handshaking",
        "pause_reading",
        "resume_reading",
        "sslobj",
        "write",
    )

    def __init__(self, raw: asyncio.Transport) -> None:
        self._raw = raw
        self.handshaking = True
        self.sslobj: _AlertKeeper | None = None
        self.write = raw.write
        self.close = raw.close
        self.get_extra_info = raw.get_extra_info
        self.pause_reading = raw.pause_reading
        self.resume_reading = raw.resume_reading

    def abort(self) -> None:
        self._force_close(None)

    def _force_close(self, exc: BaseException | None) -> None:
        raw = self._raw
        if not self.handshaking or raw.is_closing():
            raw._force_close(exc)  # type: ignore[attr-defined]  # what the TLS protocol calls
            return
        self.handshaking = False
        alert = self.sslobj.alert if self.sslobj is not None else b""
        # Not now: the TLS protocol may be in the middle of the transport's read callback.
        asyncio.get_running_loop().call_soon(self._shut, raw, alert)

    @staticmethod
    def _shut(raw: asyncio.Transport, alert: bytes) -> None:
        if raw.is_closing():
            return
        raw.set_protocol(_Drain(raw, raw.get_protocol()))
        try:
            if alert:
                raw.write(alert)
            raw.write_eof()
        except (OSError, RuntimeError):
            raw.abort()


class _AlertKeeper(ssl.SSLObject):
    """The server context's SSLObject: when the handshake fails, it keeps the alert that OpenSSL
    wrote for the client (the event loop's TLS protocol drops it unsent), so that
    :class:`_Handshaking` can send it: the client then learns why ("unknown ca")."""

    #: The one made last; taken right away by :class:`TlsHandshake` (it is made synchronously).
    last: _AlertKeeper | None = None
    _out: ssl.MemoryBIO
    alert: bytes

    @classmethod
    def _create(cls, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, *args: Any, **kwargs: Any) -> Any:
        obj = super()._create(incoming, outgoing, *args, **kwargs)  # type: ignore[misc]
        obj._out = outgoing
        obj.alert = b""
        _AlertKeeper.last = obj
        return obj

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError:
            self.alert = self._out.read()
            raise


class _Drain(asyncio.Protocol):
    """Read and drop what a refused client still sends, until it closes (1 s at most); then
    tell the TLS protocol the connection is gone, as it would have been told without us."""

    def __init__(self, raw: asyncio.Transport, tls: asyncio.BaseProtocol) -> None:
        self._tls = tls
        self._timer = asyncio.get_running_loop().call_later(1.0, raw.abort)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # close

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()
        self._tls.connection_lost(exc)


def _ssl_protocol(loop: asyncio.AbstractEventLoop) -> Any:
    """The TLS protocol class of ``loop`` (uvloop's is compiled; asyncio's for other loops)."""
    try:
        import uvloop.loop

        if isinstance(loop, uvloop.loop.Loop):
            return uvloop.loop.SSLProtocol
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        pass
    import asyncio.sslproto

    return asyncio.sslproto.SSLProtocol


def _address(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return str(peer)


def _log_refusal(peer: str, exc: BaseException) -> None:
    if isinstance(exc, TimeoutError | ConnectionAbortedError) and "handshake" in str(exc).lower():
        log.info("TLS handshake with %s: no handshake in time (limits.head_timeout_s)", peer)
    elif isinstance(exc, ssl.SSLError):
        log.warning("TLS handshake with %s refused: %s", peer, reason(exc))
    else:  # the client went away mid-handshake: its business
        log.debug("TLS handshake with %s ended: %s", peer, exc)


def guarded_protocol(limits: Limits, tls: ssl.SSLContext | None = None) -> type[asyncio.Protocol]:
    """The protocol class for uvicorn's ``http=``, bound to ``limits`` (one per server); with
    ``tls``, connections are HTTPS (see :class:`TlsHandshake`)."""
    attrs = {"limits": limits, "cap": connection_cap(limits), "waiting": _Waiting()}
    if tls is None:
        return type("GuardedProtocol", (GuardedProtocol,), attrs)
    tls.sslobject_class = _AlertKeeper
    protocol = type("GuardedProtocol", (_TlsGuardedProtocol,), attrs)
    attrs = {"protocol": protocol, "context": tls, "handshaking": collections.OrderedDict()}
    return type("TlsHandshake", (TlsHandshake,), attrs)
