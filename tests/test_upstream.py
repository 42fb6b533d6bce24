"""Header hygiene on the way to the upstream and back (the wire itself: test_http1.py)."""

from __future__ import annotations

from rolemesh_gateway.common.relay import (
    response_headers,
    upstream_headers,
)


def test_header_hygiene() -> None:
    client = [
        (b"authorization", b"Bearer k"),
        (b"x-api-key", b"k"),
        (b"connection", b"keep-alive"),
        (b"host", b"gw"),
        (b"content-length", b"2"),
        (b"x-rolemesh-node-key", b"n"),
        (b"content-type", b"application/json"),
        (b"x-trace", b"1"),
    ]
    assert upstream_headers(client, [(b"x-request-id", b"r")]) == [
        (b"content-type", b"application/json"),
        (b"x-trace", b"1"),
        (b"x-request-id", b"r"),
    ]
    raw = [
        (b"content-type", b"text/event-stream"),
        (b"transfer-encoding", b"chunked"),
        (b"server", b"llama"),
        (b"x-slot", b"0"),
    ]
    assert response_headers(raw) == [(b"content-type", b"text/event-stream"), (b"x-slot", b"0")]
