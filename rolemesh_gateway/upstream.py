"""Outbound HTTP: one pooled aiohttp session, header hygiene, error translation, relaying.

This is the one place where aiohttp errors become :mod:`rolemesh_gateway.errors` exceptions,
and where an upstream response is relayed to an ASGI client: bodies with a length in one
piece, everything else (SSE, chunked) chunk by chunk as it arrives.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass

import aiohttp

from .asgi import Headers, Send, sse_error_event
from .errors import GatewayError, UpstreamFailed, UpstreamTimeout
from .settings import Timeouts

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
CREDENTIALS = frozenset({b"authorization", b"x-api-key", b"x-rolemesh-node-key"})
_DROP_REQUEST = HOP_BY_HOP | CREDENTIALS
_DROP_RESPONSE = HOP_BY_HOP | {b"server", b"date"}
_SKIP_AUTO = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})

SSE_HEADERS: Headers = [(b"x-accel-buffering", b"no"), (b"cache-control", b"no-cache")]


class UpstreamUnreachable(UpstreamFailed):
    """Could not connect at all: nothing was sent, so trying another node is always safe."""


@dataclass(frozen=True, slots=True)
class Failure:
    """What :func:`translate` made of a third-party error."""

    error: GatewayError
    before_response: bool


def upstream_headers(client: Headers, extra: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The client's headers minus hop-by-hop and credentials, plus ``extra``."""
    out = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in client if k not in _DROP_REQUEST]
    out.extend(extra)
    return out


def response_headers(raw: tuple[tuple[bytes, bytes], ...]) -> Headers:
    return [(k.lower(), v) for k, v in raw if k.lower() not in _DROP_RESPONSE]


def translate(exc: BaseException, target: str) -> GatewayError:
    """Map an aiohttp / asyncio error to our exception tree (the one choke point)."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return UpstreamUnreachable(f"timed out connecting to upstream {target}")
        return UpstreamUnreachable(f"cannot connect to upstream {target}: {exc.os_error.strerror or exc}")
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeout(f"upstream {target} did not answer in time")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return UpstreamFailed(f"upstream {target} closed the connection")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return UpstreamFailed(f"upstream {target} sent a broken response body")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return UpstreamFailed(f"upstream {target} failed: {exc.__class__.__name__}: {exc}")
    raise exc


class UpstreamClient:
    """The process-wide pooled client. Create in start-up, close in shutdown."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # limit=0: no hidden concurrency cap (a default of 100 would queue the 101st stream).
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=60, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_SKIP_AUTO,  # once here, not parsed again on every request
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("UpstreamClient.start() was not called")
        return self._session

    async def open(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: bytes,
        timeouts: Timeouts,
        target: str,
    ) -> aiohttp.ClientResponse:
        """Send a request; return once the response head arrived (first byte)."""
        timeout = _client_timeout(timeouts)
        for attempt in (1, 2):
            try:
                resp = await self.session.request(
                    method,
                    url,
                    data=body or None,
                    headers=headers,
                    timeout=timeout,
                    allow_redirects=False,
                )
                break
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # A pooled keep-alive connection that the server had already closed (llama-server
                # does so after a streamed answer although it announced keep-alive) fails before
                # any answer: send once more, on a fresh connection.
                if attempt == 1 and not isinstance(exc, aiohttp.ClientConnectorError):
                    log.debug("retrying %s on a fresh connection after %r", target, exc)
                    continue
                raise translate(exc, target) from exc
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                raise translate(exc, target) from exc
        conn = resp.connection
        if conn is not None and conn.protocol is not None:
            # From the head on, the limit is idle_s between chunks. Re-arm now: aiohttp would
            # otherwise keep the first_byte_s timer until the next chunk arrives.
            conn.protocol.read_timeout = timeouts.idle_s
            conn.protocol.start_timeout()
        return resp

    async def get(self, url: str, timeout_s: float, headers: dict[str, str] | None = None) -> int:
        """A small GET for probes; returns the status (raises GatewayError on failure)."""
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with self.session.get(url, timeout=timeout, headers=headers, allow_redirects=False) as resp:
                await resp.read()
                return resp.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise translate(exc, url) from exc


@functools.lru_cache(maxsize=64)
def _client_timeout(t: Timeouts) -> aiohttp.ClientTimeout:
    """The aiohttp timeout for a route (built once per distinct setting, not per request)."""
    return aiohttp.ClientTimeout(total=t.total_s, sock_connect=t.connect_s, sock_read=t.first_byte_s)


def is_streamed(resp: aiohttp.ClientResponse) -> bool:
    return resp.content_type == "text/event-stream" or resp.content_length is None


async def relay(resp: aiohttp.ClientResponse, send: Send, extra_headers: Headers, target: str) -> int:
    """Relay an upstream response to the ASGI client; returns the bytes relayed.

    Errors after the head was sent end an SSE stream with an error event (never a silent
    cut); errors before it propagate as GatewayError so the caller can still answer or retry.
    """
    headers = response_headers(resp.raw_headers)
    headers.extend(extra_headers)
    if not is_streamed(resp):
        try:
            body = await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise translate(exc, target) from exc
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return len(body)
    sse = resp.content_type == "text/event-stream"
    if sse:
        headers.extend(SSE_HEADERS)
    await send({"type": "http.response.start", "status": resp.status, "headers": headers})
    total = 0
    watchdog = _IdleWatchdog.take_over(resp)
    try:
        async for chunk in resp.content.iter_any():
            total += len(chunk)
            if watchdog is not None:
                watchdog.last = watchdog.loop.time()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        err = translate(exc, target)
        log.warning("stream from %s broke after %d bytes: %s", target, total, err.message)
        tail = sse_error_event(err) if sse else b""
        await send({"type": "http.response.body", "body": tail, "more_body": False})
        raise StreamBroken(err) from exc
    finally:
        if watchdog is not None:
            watchdog.cancel()
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return total


class _IdleWatchdog:
    """Fails a stream that stays silent for ``idle_s`` (the route's idle timeout).

    aiohttp enforces its read timeout by cancelling and re-creating a timer on every chunk
    (7-8% of the gateway's CPU with 1,000 streams open). This keeps one timer per stream and
    re-arms it lazily, so a chunk costs one float store.
    """

    __slots__ = ("handle", "idle_s", "last", "loop", "stream")

    def __init__(self, stream: aiohttp.StreamReader, idle_s: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.stream = stream
        self.idle_s = idle_s
        self.last = self.loop.time()
        self.handle = self.loop.call_at(self.last + idle_s, self._check)

    @classmethod
    def take_over(cls, resp: aiohttp.ClientResponse) -> _IdleWatchdog | None:
        conn = resp.connection
        proto = conn.protocol if conn is not None else None
        idle = proto.read_timeout if proto is not None else None
        if proto is None or not idle:
            return None
        proto.read_timeout = None
        proto.start_timeout()  # cancels aiohttp's own timer; it stays off for this response
        return cls(resp.content, idle)

    def _check(self) -> None:
        due = self.last + self.idle_s
        if self.loop.time() >= due:
            self.stream.set_exception(aiohttp.SocketTimeoutError("no data from upstream for idle_s"))
        else:
            self.handle = self.loop.call_at(due, self._check)

    def cancel(self) -> None:
        self.handle.cancel()


class StreamBroken(Exception):
    """The upstream failed after the response had started; the client was told in-band."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error
