"""The health probe against a real tiny HTTP server on 127.0.0.1, through the real client."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

from rolemesh_gateway.common.http1 import Client
from rolemesh_gateway.common.probe import ProbeResult, probe
from tests.fakeclient import FakeClient, Raise, Reply, run

STATUS = {"/health": 200, "/nothing-here": 404, "/loading": 503, "/teapot": 418, "/created": 201}
REASONS = {200: b"OK", 201: b"Created", 404: b"Not Found", 418: b"I'm a teapot", 503: b"Service Unavailable"}


async def with_server(test: Callable[[str, Client], Awaitable[None]]) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                status = STATUS.get(path, 404)
                body = b'{"status":"x"}'
                writer.write(
                    b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                    % (status, REASONS[status], len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = Client()
    try:
        await test(f"http://127.0.0.1:{port}", client)
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connecting is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_200_is_up() -> None:
    async def go(base: str, client: Client) -> None:
        assert await probe(client, base + "/health", 2.0) == ProbeResult(True, "ok", 200)
        assert await probe(client, base + "/health", 2.0, strict=True) == ProbeResult(True, "ok", 200)

    run(with_server(go))


def test_404_is_up_unless_strict() -> None:
    async def go(base: str, client: Client) -> None:
        # A server without a health path is still a server that answers.
        assert await probe(client, base + "/nothing-here", 2.0) == ProbeResult(True, "ok", 404)
        assert await probe(client, base + "/teapot", 2.0) == ProbeResult(True, "ok", 418)
        result = await probe(client, base + "/nothing-here", 2.0, strict=True)
        assert result == ProbeResult(False, f"{base}/nothing-here answered HTTP 404", 404)
        assert not (await probe(client, base + "/created", 2.0, strict=True)).up  # exactly 200

    run(with_server(go))


def test_503_is_down_naming_the_status() -> None:
    async def go(base: str, client: Client) -> None:
        up, reason, status = await probe(client, base + "/loading", 2.0)
        assert not up and status == 503
        assert reason == f"{base}/loading answered HTTP 503"

    run(with_server(go))


def test_connection_refused_is_down_without_a_status() -> None:
    async def go() -> None:
        client = Client()
        try:
            url = f"http://127.0.0.1:{closed_port()}/health"
            up, reason, status = await probe(client, url, 2.0)
        finally:
            await client.close()
        assert not up and status is None
        assert reason.startswith(f"cannot connect to {url}")

    run(go())


def test_timeout_is_down_with_the_clients_message() -> None:
    async def go() -> None:
        from rolemesh_gateway.common.errors import UpstreamTimeout

        client = FakeClient().on("http://slow/health", Raise(UpstreamTimeout("http://slow/health timed out")))
        result = await probe(client, "http://slow/health", 0.5)  # type: ignore[arg-type]
        assert result == ProbeResult(False, "http://slow/health timed out", None)
        (call,) = client.calls
        assert (call.method, call.timeout, call.body) == ("GET", 0.5, b"")

    run(go())


def test_probe_reads_and_releases_the_answer() -> None:
    async def go() -> None:
        client = FakeClient().on("http://x/health", Reply.json(200, {"status": "ok"}))
        assert (await probe(client, "http://x/health", 1.0)).up  # type: ignore[arg-type]
        assert client.all_released()

    run(go())
