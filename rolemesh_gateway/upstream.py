"""Outbound HTTP: the pooled client, header hygiene and relaying.

The wire work is in :mod:`rolemesh_gateway.http1`, which raises only
:mod:`rolemesh_gateway.errors` exceptions. This is where an upstream response is relayed to an
ASGI client: bodies with a length in one piece, everything else (SSE, chunked) chunk by chunk
as it arrives.
"""

from __future__ import annotations

import logging

from .asgi import Headers, Send, sse_error_event
from .errors import GatewayError
from .http1 import Client, Response, UpstreamUnreachable
from .protocol import NODE_KEY
from .settings import Timeouts

__all__ = ["UpstreamClient", "UpstreamUnreachable", "relay", "upstream_headers"]

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
_DROP_RESPONSE = HOP_BY_HOP | {b"server", b"date"}

SSE_HEADERS: Headers = [(b"x-accel-buffering", b"no"), (b"cache-control", b"no-cache")]


def upstream_headers(client: Headers, extra: Headers) -> Headers:
    """The client's headers minus hop-by-hop and credentials, plus ``extra``."""
    out = [(k, v) for k, v in client if k not in _DROP_REQUEST]
    out.extend(extra)
    return out


def response_headers(raw: Headers) -> Headers:
    """An upstream answer's headers (names already lower-case) minus hop-by-hop ones."""
    return [(k, v) for k, v in raw if k not in _DROP_RESPONSE]


class UpstreamClient:
    """The process-wide pooled client. Create in start-up, close in shutdown."""

    def __init__(self) -> None:
        self._client: Client | None = None

    async def start(self) -> None:
        self._client = Client(keepalive_s=30.0)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    @property
    def client(self) -> Client:
        if self._client is None:
            raise RuntimeError("UpstreamClient.start() was not called")
        return self._client

    async def open(
        self, method: str, url: str, headers: Headers, body: bytes, timeouts: Timeouts, target: str
    ) -> Response:
        """Send a request; return once the response head arrived (first byte)."""
        return await self.client.open(method, url, headers, body, timeouts, target)

    async def fetch(
        self,
        method: str,
        url: str,
        timeout_s: float,
        headers: Headers | None = None,
        body: bytes = b"",
        target: str | None = None,
    ) -> tuple[int, bytes]:
        """A small request read to its end (probes, registration): ``(status, body)``."""
        return await self.client.request(method, url, headers or (), body, timeout_s, target or url)

    async def get(self, url: str, timeout_s: float) -> int:
        """A small GET for probes; returns the status (raises GatewayError on failure)."""
        status, _ = await self.fetch("GET", url, timeout_s)
        return status


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


async def relay(resp: Response, send: Send, extra_headers: Headers, target: str) -> int:
    """Relay an upstream response to the ASGI client; returns the bytes relayed.

    Errors before the head was sent propagate as GatewayError, so the caller can still answer
    or retry. After it, an SSE stream ends with an error event; any other body is left
    unfinished, and the server closes the connection, so that a client never takes a cut
    body for a whole one.
    """
    headers = response_headers(resp.headers)
    headers.extend(extra_headers)
    if not _is_streamed(resp):
        body = await resp.read()
        headers.append((b"content-length", b"%d" % len(body)))
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return len(body)
    sse = resp.content_type == "text/event-stream"
    if sse:
        headers.extend(SSE_HEADERS)
    if resp.content_length is not None:
        headers.append((b"content-length", b"%d" % resp.content_length))
    await send({"type": "http.response.start", "status": resp.status, "headers": headers})
    total = 0
    try:
        while chunk := await resp.next_chunk():
            total += len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except GatewayError as err:
        log.warning("stream from %s broke after %d bytes: %s", target, total, err.message)
        if sse:
            await send({"type": "http.response.body", "body": sse_error_event(err), "more_body": False})
        raise StreamBroken(err) from err
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return total


class StreamBroken(Exception):
    """The upstream failed after the response had started; the client was told in-band."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error
