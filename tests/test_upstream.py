"""The upstream client: error translation, header hygiene, stale pooled connections."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from rolemesh_gateway.errors import UpstreamFailed, UpstreamTimeout
from rolemesh_gateway.settings import Timeouts
from rolemesh_gateway.upstream import (
    UpstreamClient,
    UpstreamUnreachable,
    response_headers,
    translate,
    upstream_headers,
)

BODY = b'{"ok":true}'


async def _closing_server() -> tuple[asyncio.Server, list[int]]:
    """Answers one request per connection, claims keep-alive, drops the next (like llama-server)."""
    served: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            ),
            0,
        )
        await reader.readexactly(length)
        served.append(len(served))
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
        )
        await writer.drain()
        # The next request on this connection is read, then the connection is dropped unanswered.
        await reader.read(1)
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, served


def test_a_pooled_connection_closed_by_the_server_is_retried_once() -> None:
    async def go() -> None:
        server, served = await _closing_server()
        port = server.sockets[0].getsockname()[1]
        client = UpstreamClient()
        await client.start()
        try:
            for _ in range(3):
                resp = await client.open(
                    "POST", f"http://127.0.0.1:{port}/v1/chat/completions", [], b"{}", Timeouts(), "t"
                )
                assert await resp.read() == BODY
                resp.release()
            assert len(served) == 3
        finally:
            await client.close()
            await asyncio.sleep(0.05)
            server.close()
            await server.wait_closed()

    asyncio.run(go())


def test_refused_and_timeouts_are_translated() -> None:
    async def go() -> None:
        client = UpstreamClient()
        await client.start()
        try:
            with pytest.raises(UpstreamUnreachable, match="cannot connect"):
                await client.open("POST", "http://127.0.0.1:9/x", [], b"{}", Timeouts(), "dead")

            writers: list[asyncio.StreamWriter] = []

            async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                writers.append(writer)
                await reader.read()  # never answers; returns when the client hangs up
                writer.close()

            server = await asyncio.start_server(silent, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            with pytest.raises(UpstreamTimeout):
                await client.open(
                    "POST", f"http://127.0.0.1:{port}/", [], b"{}", Timeouts(first_byte_s=0.2), "silent"
                )
            await asyncio.sleep(0.05)
            for w in writers:
                w.close()
                await w.wait_closed()
            server.close()
            await server.wait_closed()
        finally:
            await client.close()

    asyncio.run(go())


def test_translate_maps_third_party_errors() -> None:
    assert isinstance(translate(aiohttp.ServerDisconnectedError(), "t"), UpstreamFailed)
    assert isinstance(translate(TimeoutError(), "t"), UpstreamTimeout)
    assert isinstance(translate(aiohttp.ClientPayloadError("x"), "t"), UpstreamFailed)
    with pytest.raises(ValueError):
        translate(ValueError("not ours"), "t")


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
    assert upstream_headers(client, [("X-Request-ID", "r")]) == [
        ("content-type", "application/json"),
        ("x-trace", "1"),
        ("X-Request-ID", "r"),
    ]
    raw = (
        (b"Content-Type", b"text/event-stream"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Server", b"llama"),
        (b"X-Slot", b"0"),
    )
    assert response_headers(raw) == [(b"content-type", b"text/event-stream"), (b"x-slot", b"0")]
