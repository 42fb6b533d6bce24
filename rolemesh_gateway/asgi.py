"""Small ASGI helpers shared by the gateway and the node agent (kept thin: hot path)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from .errors import GatewayError, PayloadTooLarge

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

JSON_HEADERS: Headers = [(b"content-type", b"application/json")]


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
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


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


async def send_error(send: Send, exc: GatewayError, headers: Headers | None = None) -> None:
    extra = list(headers or [])
    if exc.status == 401:
        extra.append((b"www-authenticate", b'Bearer realm="rolemesh"'))
    await send_bytes(send, exc.status, exc.body(), JSON_HEADERS + extra)


def sse_error_event(exc: GatewayError) -> bytes:
    """An SSE event that OpenAI clients raise as an APIError when a stream breaks."""
    return b"data: " + exc.body() + b"\n\n"
