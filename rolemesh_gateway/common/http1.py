"""A lean pooled HTTP/1.1 client for the hot path: an asyncio protocol and the httptools parser.

Why not aiohttp: a relayed request is one small write and, usually, one read that holds the
whole answer. aiohttp spends most of a gateway hop's CPU around that (request and response
objects, header multidicts, timer objects, a stream reader); this spends a few microseconds.

What it does, and nothing more:

- keep-alive connections pooled per ``scheme://host:port``, most recently used first; a pooled
  connection idle longer than ``keepalive_s`` is closed, not reused, and :meth:`Client.sweep`
  (run periodically by both programs) closes it even when its origin is never used again;
- a request that meets a pooled connection the server had already closed (no byte of answer
  came back) is sent once more on a fresh connection; nothing else is ever retried;
- timeouts: ``connect_s`` to connect, ``first_byte_s`` a deadline for the whole response head
  (a trickled head or endless ``1xx`` answers do not extend it), ``idle_s`` between body
  bytes, ``total_s`` for the whole exchange; one timer per exchange;
- bounds on what an upstream may send: a response head of at most ``MAX_RESPONSE_HEAD`` bytes
  and ``MAX_RESPONSE_HEADERS`` headers, a status from 200 to 599, and for :meth:`Client.request`
  (probes, control calls) a body of at most ``max_bytes``;
- bodies with a length, chunked bodies and bodies that end with the connection; streamed bodies
  are handed over as they arrive, and reading from the upstream pauses while more than
  ``_HIGH_WATER`` bytes wait for a slow consumer;
- https with the system's trust store, or with the context given (a private CA, a client
  certificate: :mod:`~rolemesh_gateway.common.tls`), made once, not per request; the name
  checked in the server's certificate is the URL's host, or ``server_hostname`` when given.

Every failure is raised as a :mod:`~rolemesh_gateway.common.errors` exception whose message names
``target`` as the caller gave it ("upstream planner (http://...)", "gateway http://..."); this is the
one place where socket, TLS and parser errors are translated.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, cast

import httptools

from .errors import UpstreamFailed, UpstreamTimeout, UpstreamUnreachable

RawHeaders = list[tuple[bytes, bytes]]

#: Pause reading from the upstream while this many body bytes wait for the consumer.
_HIGH_WATER = 256 * 1024
#: A response head larger than this, or with more headers, is a malformed answer.
MAX_RESPONSE_HEAD = 64 * 1024
MAX_RESPONSE_HEADERS = 256
#: At most this many idle connections are kept per upstream.
_MAX_IDLE = 1024
_INF = float("inf")


class Timeouts(Protocol):
    """What an exchange is bounded by, in seconds (``common.config.Timeouts`` is one)."""

    @property
    def connect_s(self) -> float: ...
    @property
    def first_byte_s(self) -> float: ...
    @property
    def idle_s(self) -> float: ...
    @property
    def total_s(self) -> float | None: ...


@dataclass(frozen=True, slots=True)
class FixedTimeouts:
    """A plain :class:`Timeouts` value (for small requests bounded by one figure)."""

    connect_s: float
    first_byte_s: float
    idle_s: float
    total_s: float | None


class _Stale(Exception):
    """A reused connection died before any byte of the answer: safe to send again."""


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context()


@functools.lru_cache(maxsize=256)
def _origin(scheme: str, netloc: str) -> tuple[str, int, bool, bytes]:
    """``(host, port, tls, host header)`` of an origin (parsed once per origin)."""
    tls = scheme == "https"
    if scheme not in ("http", "https") or not netloc:
        raise ValueError(f"not an http(s) URL: {scheme}://{netloc}")
    if netloc.startswith("["):  # [v6]:port
        end = netloc.index("]")
        host, rest = netloc[1:end], netloc[end + 1 :]
        port = int(rest[1:]) if rest.startswith(":") else (443 if tls else 80)
    elif ":" in netloc:
        host, _, p = netloc.rpartition(":")
        port = int(p)
    else:
        host, port = netloc, 443 if tls else 80
    header = netloc
    if not netloc.isascii():  # an internationalised name goes on the wire in its ASCII form
        header = host.encode("idna").decode("ascii") + netloc[len(host) :]
    return host, port, tls, header.encode("ascii")


def split_url(url: str) -> tuple[tuple[str, str], str]:
    """``((scheme, netloc), request target)`` of an absolute http(s) URL."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"not an absolute URL: {url!r}")
    slash = rest.find("/")
    if slash < 0:
        query = rest.find("?")
        if query < 0:
            return (scheme, rest), "/"
        return (scheme, rest[:query]), "/" + rest[query:]
    return (scheme, rest[:slash]), rest[slash:]


class Response:
    """One exchange: the head once :meth:`Client.open` returns, the body as it arrives.

    Call :meth:`release` when done (in a ``finally``): the connection goes back to the pool if
    the body was read to its end, and is closed otherwise (which is how an upstream learns
    that the client went away).
    """

    __slots__ = (
        "_body",
        "_buffered",
        "_conn",
        "_deadline",
        "_error",
        "_limit",
        "_paused",
        "_timeouts",
        "_timer",
        "_waiter",
        "complete",
        "content_length",
        "content_type",
        "got_bytes",
        "head_bytes",
        "head_done",
        "headers",
        "last",
        "pool",
        "reuse",
        "status",
        "target",
        "until_close",
    )

    def __init__(self, conn: _Conn, target: str, timeouts: Timeouts, pool: _Pool, head_only: bool) -> None:
        self._conn = conn
        self.target = target
        self.pool = pool
        self._timeouts = timeouts
        self.status = 0
        self.headers: RawHeaders = []
        self.content_type = ""
        self.content_length: int | None = None
        self.head_done = False
        self.head_bytes = 0
        self.complete = False
        self.got_bytes = False
        self.until_close = False
        self.reuse = not head_only
        self._body: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        loop = conn.loop
        self.last = now = loop.time()
        self._limit = timeouts.first_byte_s
        self._deadline = now + timeouts.total_s if timeouts.total_s is not None else _INF
        # The first check comes no later than either limit would be due, so that an idle limit
        # shorter than first_byte_s holds from the head on without re-arming the timer then.
        due = min(now + min(self._limit, timeouts.idle_s), self._deadline)
        self._timer: asyncio.TimerHandle | None = loop.call_at(due, self._tick)

    # -- reading ----------------------------------------------------------------------------
    async def read(self) -> bytes:
        """The whole body."""
        if self.complete:  # the usual case: it came with the head
            return self._take()
        parts = []
        while chunk := await self.next_chunk():
            parts.append(chunk)
        return b"".join(parts)

    async def next_chunk(self) -> bytes:
        """The body bytes that arrived since the last call (waiting for some); b"" at the end."""
        while True:
            if self._body:
                return self._take()
            if self.complete:
                return b""
            await self._wait()

    def _take(self) -> bytes:
        body = self._body
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self._buffered = 0
        if self._paused:
            self._paused = False
            self._conn.resume()
        return data

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        waiter = self._waiter = self._conn.loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None
        if self._error is not None and not self._body:
            raise self._error

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: Exception) -> None:
        if self._error is None and not self.complete:
            self._error = error
            self.reuse = False
        self._wake()

    # -- timeouts ---------------------------------------------------------------------------
    def _tick(self) -> None:
        self._timer = None
        if self.complete or self._error is not None:
            return
        loop = self._conn.loop
        now = loop.time()
        if now >= self._deadline:
            self._fail(UpstreamTimeout(f"{self.target} did not finish in time (total_s)"))
        elif now >= self.last + self._limit:
            what = "answer" if not self.head_done else "send more of its answer"
            self._fail(UpstreamTimeout(f"{self.target} did not {what} in time"))
        else:
            self._timer = loop.call_at(min(self.last + self._limit, self._deadline), self._tick)
            return
        self._conn.abort()

    # -- events from the connection ---------------------------------------------------------
    def on_head(self, status: int) -> None:
        if not 200 <= status <= 599:  # 1xx are skipped before this; anything else is nonsense
            self._fail(UpstreamFailed(f"{self.target} answered with the impossible status {status}"))
            self._conn.abort()
            return
        self.status = status
        self.head_done = True
        self._limit = self._timeouts.idle_s
        chunked = False
        for name, value in self.headers:
            if name == b"content-type":
                self.content_type = value.partition(b";")[0].strip().lower().decode("latin-1")
            elif name == b"content-length":
                self.content_length = int(value)
            elif name == b"transfer-encoding":
                chunked = True
        # Neither a length nor chunked: the body ends when the connection does.
        self.until_close = self.content_length is None and not chunked
        if not self.reuse:  # an answer to HEAD: no body follows
            self.complete = True

    def on_body(self, data: bytes) -> None:
        self._body.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER and not self._paused:
            self._paused = True
            self._conn.pause()

    def on_complete(self) -> None:
        self.complete = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def on_lost(self, exc: BaseException | None) -> None:
        if self.complete or self._error is not None:  # done, or we closed it (a timeout)
            return
        if self.head_done and self.until_close and exc is None:
            self.reuse = False
            self.on_complete()
            self._wake()
            return
        if isinstance(exc, ssl.SSLError):  # e.g. the server refused our certificate (TLS 1.3: after connect)
            self._fail(UpstreamUnreachable(f"{self.target} refused the TLS connection: {tls_reason(exc)}"))
        elif not self.got_bytes:
            self._fail(_Stale())
        elif self.head_done:
            self._fail(UpstreamFailed(f"{self.target} closed the connection mid-answer"))
        else:
            self._fail(UpstreamFailed(f"{self.target} closed the connection"))

    # -- the end ----------------------------------------------------------------------------
    def release(self) -> None:
        """Give the connection back (body fully read) or close it (anything else)."""
        conn = self._conn
        if conn.resp is not self:
            return
        conn.resp = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.complete and self.reuse and self._error is None and conn.reusable():
            self.pool.put(conn)
        else:
            conn.abort()


class _Conn(asyncio.Protocol):
    """One upstream connection; the parser feeds the current :class:`Response`."""

    __slots__ = ("_expect_headers", "closed", "idle_since", "loop", "parser", "resp", "transport")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: Response | None = None
        self.closed = False
        self.idle_since = 0.0

    # protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None or resp.complete:
            self.abort()  # bytes nobody asked for: this connection is out of step
            return
        resp.got_bytes = True
        in_head = not resp.head_done
        if in_head:  # first_byte_s is a deadline for the whole head: bytes of it do not extend it
            resp.head_bytes += len(data)
        else:
            resp.last = self.loop.time()  # idle_s counts from the last body bytes
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:  # 101: not ours to relay
            resp._fail(UpstreamFailed(f"{resp.target} sent a malformed answer: {exc!r}"))
            self.abort()
            return
        if in_head:
            if resp.head_done:
                resp.last = self.loop.time()
            elif resp.head_bytes > MAX_RESPONSE_HEAD:  # checked per read: at most one read past the cap
                resp._fail(
                    UpstreamFailed(f"{resp.target} sent a response head over {MAX_RESPONSE_HEAD} bytes")
                )
                self.abort()
                return
        resp._wake()

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        resp = self.resp
        if resp is not None:
            resp.on_lost(exc)

    # parser callbacks
    def on_message_begin(self) -> None:
        resp = self.resp
        if resp is not None and resp.head_done:
            resp.reuse = False  # a second answer to one request: never reuse this connection

    def on_header(self, name: bytes, value: bytes) -> None:
        resp = self.resp
        if resp is not None and not resp.head_done:
            resp.headers.append((name.lower(), value))
            if len(resp.headers) > MAX_RESPONSE_HEADERS:
                resp._fail(UpstreamFailed(f"{resp.target} sent more than {MAX_RESPONSE_HEADERS} headers"))
                self.abort()

    def on_headers_complete(self) -> None:
        resp = self.resp
        if resp is not None and not resp.head_done:
            status = self.parser.get_status_code()
            if 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
                resp.headers.clear()
                return
            resp.on_head(status)

    def on_body(self, body: bytes) -> None:
        resp = self.resp
        if resp is not None and not resp.complete:
            resp.on_body(body)

    def on_message_complete(self) -> None:
        resp = self.resp
        if resp is not None and resp.head_done:
            # Asked now: the parser forgets the answer's keep-alive flags once it is past it.
            if not self.parser.should_keep_alive():
                resp.reuse = False
            resp.on_complete()

    # control
    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def pause(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def reusable(self) -> bool:
        # Not if part of the request is still unsent (the server answered early): the rest
        # would reach the server as the start of the next request.
        t = self.transport
        return not self.closed and t is not None and not t.is_closing() and not t.get_write_buffer_size()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class _Pool:
    """Idle connections to one origin, oldest first.

    Once closed (the client forgot it: swept empty, or shut down), a connection given back by a
    request still in flight is closed, not kept where nothing would ever reap it.
    """

    __slots__ = ("closed", "idle", "keepalive_s")

    def __init__(self, keepalive_s: float) -> None:
        self.idle: list[_Conn] = []
        self.keepalive_s = keepalive_s
        self.closed = False

    def get(self) -> _Conn | None:
        idle = self.idle
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.reusable() and now - conn.idle_since < self.keepalive_s:
                return conn
            conn.abort()
        return None

    def put(self, conn: _Conn) -> None:
        if self.closed:
            conn.abort()
            return
        idle = self.idle
        now = conn.idle_since = time.monotonic()
        # Close what has idled too long (the oldest are first), and keep the pool bounded.
        while idle and (now - idle[0].idle_since >= self.keepalive_s or len(idle) >= _MAX_IDLE):
            idle.pop(0).abort()
        idle.append(conn)

    def reap(self) -> None:
        """Close what has idled longer than ``keepalive_s`` (the oldest are first)."""
        idle = self.idle
        now = time.monotonic()
        while idle and now - idle[0].idle_since >= self.keepalive_s:
            idle.pop(0).abort()

    def close(self) -> None:
        self.closed = True
        for conn in self.idle:
            conn.abort()
        self.idle.clear()


class Client:
    """Pooled HTTP/1.1 client. One per process; :meth:`close` at shutdown."""

    def __init__(self, keepalive_s: float = 30.0, ssl_context: ssl.SSLContext | None = None) -> None:
        self._pools: dict[tuple[str, str], _Pool] = {}
        self._keepalive_s = keepalive_s
        #: For https: None is the system's trust store. Assign a new one to change it (a reload):
        #: new connections use it, pooled ones keep theirs.
        self.ssl_context = ssl_context

    async def open(
        self,
        method: str,
        url: str,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
        timeouts: Timeouts,
        target: str,
        allow: Callable[[str], bool] | None = None,
        server_hostname: str | None = None,
    ) -> Response:
        """Send a request; return once the response head arrived.

        ``allow``, when given, is asked about every address the host resolves to; only an
        allowed one is connected to (a node's URL may name a host that resolves anywhere).
        ``server_hostname``, for https, is the name the server's certificate must carry
        instead of the URL's host (connections checked for it are pooled apart).
        """
        key, path = split_url(url)
        try:
            host, port, tls, host_header = _origin(*key)
            request = _request_bytes(method, path, host_header, headers, body)
        except (ValueError, UnicodeError) as exc:  # a URL or header that cannot go on the wire
            raise UpstreamUnreachable(f"bad upstream URL or header for {target}: {exc}") from None
        if server_hostname is not None and tls:
            key = (key[0], f"{key[1]} {server_hostname}")  # no space in a host: a pool of its own
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(self._keepalive_s)
        head_only = method == "HEAD"
        conn = pool.get()
        if conn is not None:
            try:
                return await self._exchange(conn, request, timeouts, target, pool, head_only)
            except _Stale:
                pass  # the server had closed it; once more on a fresh connection
        context = (self.ssl_context or _ssl_context()) if tls else None
        conn = await self._connect(
            host, port, context, server_hostname or host, timeouts.connect_s, target, allow
        )
        try:
            return await self._exchange(conn, request, timeouts, target, pool, head_only)
        except _Stale:
            # A TLS server closes a plain-HTTP connection without a word: say what it may be.
            hint = "" if tls else " (if it serves HTTPS, use an https:// URL)"
            raise UpstreamFailed(f"{target} closed the connection without answering{hint}") from None

    async def request(
        self,
        method: str,
        url: str,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
        timeout_s: float,
        target: str,
        max_bytes: int = 1024 * 1024,
    ) -> tuple[int, bytes]:
        """A small request read to its end: ``(status, body)``; at most ``timeout_s`` in all.

        For probes and control calls: an answer longer than ``max_bytes`` is cut off and the
        connection closed (a health check never needs a large body).
        """
        limits = _limits(timeout_s)
        resp = await self.open(method, url, headers, body, limits, target)
        try:
            parts: list[bytes] = []
            total = 0
            while chunk := await resp.next_chunk():
                total += len(chunk)
                if total > max_bytes:
                    raise UpstreamFailed(f"{target} answered more than {max_bytes} bytes")
                parts.append(chunk)
            return resp.status, b"".join(parts)
        finally:
            resp.release()

    async def sweep(self) -> None:
        """Close pooled connections idle longer than ``keepalive_s``; forget empty pools."""
        for key, pool in list(self._pools.items()):
            pool.reap()
            if not pool.idle:
                pool.close()
                del self._pools[key]

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    @staticmethod
    async def _exchange(
        conn: _Conn, request: bytes, timeouts: Timeouts, target: str, pool: _Pool, head_only: bool
    ) -> Response:
        resp = conn.resp = Response(conn, target, timeouts, pool, head_only)
        try:
            conn.send(request)
            while not resp.head_done:
                await resp._wait()
        except BaseException:
            resp.release()  # not done: closes the connection
            raise
        return resp

    @staticmethod
    async def _connect(
        host: str,
        port: int,
        context: ssl.SSLContext | None,
        name: str,
        connect_s: float,
        target: str,
        allow: Callable[[str], bool] | None,
    ) -> _Conn:
        loop = asyncio.get_running_loop()
        if context is not None and name is not host:
            try:  # before connecting: a name no certificate can carry (a label over 63 characters)
                name.encode("idna")
            except UnicodeError as exc:
                bad = f"cannot connect to {target}: bad TLS server name {name!r}: {exc}"
                raise UpstreamUnreachable(bad) from None
        try:
            async with asyncio.timeout(connect_s):
                address = host
                if allow is not None:
                    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                    allowed = [str(info[4][0]) for info in infos if allow(str(info[4][0]))]
                    if not allowed:
                        found = ", ".join(sorted({str(info[4][0]) for info in infos}))
                        raise UpstreamUnreachable(f"{target} resolves to {found}, which nodes may not use")
                    address = str(allowed[0])
                _, conn = await loop.create_connection(
                    lambda: _Conn(loop),
                    address,
                    port,
                    ssl=context,
                    server_hostname=name if context is not None else None,
                )
        except TimeoutError:
            raise UpstreamUnreachable(f"timed out connecting to {target}") from None
        except ssl.SSLError as exc:
            raise UpstreamUnreachable(f"cannot connect to {target}: {tls_reason(exc)}") from None
        except OSError as exc:
            reason = exc.strerror or str(exc) or exc.__class__.__name__
            raise UpstreamUnreachable(f"cannot connect to {target}: {reason}") from None
        return conn


def tls_reason(exc: BaseException) -> str:
    """An SSL error in words: the verification message when there is one, else OpenSSL's reason.

    ``[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer
    certificate (_ssl.c:1006)`` becomes ``certificate verify failed: unable to get local issuer
    certificate``; an alert from the other side (``tlsv1 alert unknown ca``) stays as OpenSSL
    names it.
    """
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        text = str(getattr(exc, "reason", None) or "").lower().replace("_", " ")
        if text == "http request":
            return "the client spoke plain HTTP to the HTTPS port"
        if text:
            return text
    return str(exc) or exc.__class__.__name__


@functools.lru_cache(maxsize=16)
def _limits(timeout_s: float) -> FixedTimeouts:
    return FixedTimeouts(connect_s=timeout_s, first_byte_s=timeout_s, idle_s=timeout_s, total_s=timeout_s)


def _request_bytes(
    method: str, path: str, host: bytes, headers: Iterable[tuple[bytes, bytes]], body: bytes
) -> bytes:
    parts: list[bytes] = [method.encode("ascii"), b" ", path.encode("latin-1"), b" HTTP/1.1\r\nhost: ", host]
    lines = 3  # the request line, host and the blank line
    for name, value in headers:
        parts += (b"\r\n", name, b": ", value)
        lines += 1
    if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        parts.append(b"\r\ncontent-length: %d" % len(body))
        lines += 1
    parts.append(b"\r\n\r\n")
    head = b"".join(parts)
    # One line per header and no stray CR: a CR or LF inside a name or value (header injection)
    # would show as extra line breaks.
    if head.count(b"\n") != lines or head.count(b"\r") != lines or " " in path:
        raise UpstreamFailed("refusing to send a request whose target or headers contain line breaks")
    return head + body if body else head
