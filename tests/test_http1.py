"""The hot-path HTTP/1.1 client against raw asyncio servers that control every byte on the wire."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from rolemesh_gateway.common.config import Timeouts
from rolemesh_gateway.common.errors import UpstreamFailed, UpstreamTimeout, UpstreamUnreachable
from rolemesh_gateway.common.http1 import Client, _origin, split_url

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'


class Server:
    """A raw TCP server on 127.0.0.1 that counts connections and keeps every request head."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.heads: list[bytes] = []
        self.closed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Server:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self._writers.append(writer)
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                self.closed.set()
                writer.close()

        self._server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:  # the handlers' reads end, and with them the handlers
            writer.close()
        await self._server.wait_closed()
        await asyncio.sleep(0.01)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        return await reader.readexactly(length)


def run(coro: Awaitable[None]) -> None:
    async def main() -> None:
        await asyncio.wait_for(coro, 20)

    asyncio.run(main())


async def _with_client(test: Callable[[Client], Awaitable[None]]) -> None:
    client = Client()
    try:
        await test(client)
    finally:
        await client.close()


def test_sequential_requests_share_one_keep_alive_connection() -> None:
    async def go(client: Client) -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                await srv.read_request(reader)
                writer.write(OK)

        async with Server(handler) as srv:
            for _ in range(5):
                resp = await client.open("POST", srv.url + "/v1/x?a=1", [], b"{}", Timeouts(), "t")
                assert (resp.status, await resp.read()) == (200, b'{"ok":true}')
                assert resp.content_type == "application/json" and resp.content_length == 11
                resp.release()
            assert srv.connections == 1
            assert srv.heads[0].startswith(b"POST /v1/x?a=1 HTTP/1.1\r\nhost: 127.0.0.1:")
            assert b"content-length: 2\r\n" in srv.heads[0]

    run(_with_client(go))


def test_chunked_body_arrives_piece_by_piece_then_connection_is_reused() -> None:
    async def go(client: Client) -> None:
        gate = asyncio.Event()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                await srv.read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")
                writer.write(b"Transfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
                await writer.drain()
                await gate.wait()
                writer.write(b"6\r\nsecond\r\n0\r\n\r\n")

        async with Server(handler) as srv:
            for _ in range(2):
                gate.clear()
                resp = await client.open("POST", srv.url + "/", [], b"{}", Timeouts(), "t")
                assert resp.content_type == "text/event-stream" and resp.content_length is None
                assert await resp.next_chunk() == b"first"  # before the rest was even written
                gate.set()
                assert await resp.next_chunk() == b"second"
                assert await resp.next_chunk() == b""
                resp.release()
            assert srv.connections == 1

    run(_with_client(go))


def test_body_ending_with_the_connection_and_connection_close() -> None:
    async def go(client: Client) -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            if srv.connections == 1:  # HTTP/1.0 style: no length, the end of the body is EOF
                writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
            else:  # a length, but the server will close anyway
                writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

        async with Server(handler) as srv:
            resp = await client.open("GET", srv.url + "/", [], b"", Timeouts(), "t")
            assert await resp.read() == b"all of it"
            resp.release()
            resp = await client.open("GET", srv.url + "/", [], b"", Timeouts(), "t")
            assert await resp.read() == b"ok"
            resp.release()
            resp = await client.open("GET", srv.url + "/", [], b"", Timeouts(), "t")
            assert await resp.read() == b"ok"
            resp.release()
            assert srv.connections == 3  # neither connection was reused
            assert b"content-length" not in srv.heads[0]  # a GET without a body says nothing

    run(_with_client(go))


def test_timeouts_first_byte_idle_and_total() -> None:
    async def go(client: Client) -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            if srv.connections == 1:
                await reader.read()  # never answers
                return
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\none\r\n")
            await writer.drain()
            if srv.connections == 2:
                await reader.read()  # then silence
                return
            for _ in range(100):  # a byte every 0.1 s: never idle, but too long in all
                await asyncio.sleep(0.1)
                writer.write(b"1\r\nx\r\n")
                await writer.drain()

        async with Server(handler) as srv:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(UpstreamTimeout, match="did not answer in time"):
                await client.open("POST", srv.url, [], b"{}", Timeouts(first_byte_s=0.3), "t")
            assert 0.25 < loop.time() - t0 < 2

            resp = await client.open("POST", srv.url, [], b"{}", Timeouts(idle_s=0.3), "t")
            assert await resp.next_chunk() == b"one"
            t0 = loop.time()
            with pytest.raises(UpstreamTimeout, match="send more"):
                await resp.next_chunk()
            assert 0.25 < loop.time() - t0 < 2
            resp.release()

            resp = await client.open("POST", srv.url, [], b"{}", Timeouts(idle_s=0.5, total_s=0.8), "t")
            got = b""
            with pytest.raises(UpstreamTimeout, match="total_s"):
                while chunk := await resp.next_chunk():
                    got += chunk
            assert got.startswith(b"onex")  # what came before the limit was handed over
            resp.release()

    run(_with_client(go))


def test_a_body_that_ends_with_the_connection_still_times_out() -> None:
    async def go(client: Client) -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart of it")
            await writer.drain()
            await reader.read()  # then silence, until the client gives up

        async with Server(handler) as srv:
            resp = await client.open("GET", srv.url, [], b"", Timeouts(idle_s=0.3), "t")
            # Closing the connection on the timeout must not pass for the end of the body.
            with pytest.raises(UpstreamTimeout):
                await resp.read()
            resp.release()

    run(_with_client(go))


def test_connect_errors_are_unreachable() -> None:
    async def go(client: Client) -> None:
        with pytest.raises(UpstreamUnreachable, match="cannot connect to dead"):
            await client.open("POST", "http://127.0.0.1:9/x", [], b"{}", Timeouts(), "dead")
        with pytest.raises(UpstreamUnreachable, match="bad upstream URL or header"):
            await client.open("POST", "ftp://127.0.0.1:9/x", [], b"{}", Timeouts(), "odd")

    run(_with_client(go))


def test_header_injection_is_refused_before_anything_is_sent() -> None:
    async def go(client: Client) -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()

        async with Server(handler) as srv:
            for headers in ([(b"x-a", b"1\r\nx-evil: 1")], [(b"x-a\nx-evil", b"1")], [(b"x-a", b"1\r")]):
                with pytest.raises(UpstreamFailed, match="line breaks"):
                    await client.open("POST", srv.url, headers, b"{}", Timeouts(), "t")
            assert srv.connections == 0

    run(_with_client(go))


def test_malformed_answer_and_early_close_fail_cleanly() -> None:
    async def go(client: Client) -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            if srv.connections == 1:
                writer.write(b"NOT HTTP AT ALL\r\n\r\n")
            elif srv.connections == 2:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
            await writer.drain()  # and the third closes without a word

        async with Server(handler) as srv:
            with pytest.raises(UpstreamFailed, match="malformed"):
                await client.open("POST", srv.url, [], b"{}", Timeouts(), "t")
            resp = await client.open("POST", srv.url, [], b"{}", Timeouts(), "t")
            with pytest.raises(UpstreamFailed, match="mid-answer"):
                await resp.read()
            resp.release()
            with pytest.raises(UpstreamFailed, match="without answering"):
                await client.open("POST", srv.url, [], b"{}", Timeouts(), "t")

    run(_with_client(go))


def test_a_slow_reader_pauses_the_upstream_instead_of_buffering_it_all() -> None:
    async def go(client: Client) -> None:
        total = 64 * 1024 * 1024
        sent = 0

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal sent
            await srv.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
            block = b"x" * 65536
            while sent < total:
                writer.write(block)
                await writer.drain()  # blocks once the client stops reading
                sent += len(block)

        async with Server(handler) as srv:
            resp = await client.open("POST", srv.url, [], b"{}", Timeouts(), "t")
            assert await resp.next_chunk()
            await asyncio.sleep(0.5)  # a client that reads nothing for a while
            assert sent < total / 4  # the upstream was held back, not read into memory
            got = 0
            while chunk := await resp.next_chunk():
                got += len(chunk)
            assert sent == total
            resp.release()

    run(_with_client(go))


def test_release_before_the_end_closes_the_connection() -> None:
    async def go(client: Client) -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\none\r\n")
            await writer.drain()
            await reader.read()  # returns when the client hangs up

        async with Server(handler) as srv:
            resp = await client.open("POST", srv.url, [], b"{}", Timeouts(), "t")
            assert await resp.next_chunk() == b"one"
            resp.release()  # a client went away mid-stream
            await asyncio.wait_for(srv.closed.wait(), 2)

    run(_with_client(go))


def test_a_stale_pooled_connection_is_replaced_once() -> None:
    async def go(client: Client) -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            writer.write(OK)
            await writer.drain()
            await reader.read(1)  # the next request is read and dropped unanswered

        async with Server(handler) as srv:
            for _ in range(3):
                resp = await client.open("POST", srv.url, [], b"{}", Timeouts(), "t")
                assert await resp.read() == b'{"ok":true}'
                resp.release()
            assert srv.connections == 3

    run(_with_client(go))


def test_head_requests_end_at_the_head() -> None:
    async def go(client: Client) -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n")
            await writer.drain()
            await reader.read()

        async with Server(handler) as srv:
            resp = await client.open("HEAD", srv.url, [], b"", Timeouts(first_byte_s=2), "t")
            assert resp.content_length == 500 and await resp.read() == b""
            resp.release()

    run(_with_client(go))


def test_split_url() -> None:
    assert split_url("http://h:1/a/b?c=d") == (("http", "h:1"), "/a/b?c=d")
    assert split_url("http://h") == (("http", "h"), "/")
    assert split_url("https://h?x") == (("https", "h"), "/?x")
    assert split_url("http://[::1]:8/v1") == (("http", "[::1]:8"), "/v1")


def test_origin_host_and_host_header() -> None:
    assert _origin("http", "münchen.de:8080") == ("münchen.de", 8080, False, b"xn--mnchen-3ya.de:8080")
    assert _origin("https", "h") == ("h", 443, True, b"h")
    assert _origin("http", "[::1]:9") == ("::1", 9, False, b"[::1]:9")
    with pytest.raises(ValueError):
        _origin("http", "h:notaport")


# -- https --------------------------------------------------------------------------------
_TLS_CHILD = """
import asyncio, sys
from rolemesh_gateway.common.config import Timeouts
from rolemesh_gateway.common.http1 import Client

async def main():
    client = Client()
    try:
        resp = await client.open("GET", sys.argv[1], [], b"", Timeouts(), "tls")
        print(resp.status, (await resp.read()).decode())
        resp.release()
    except Exception as exc:
        print("ERROR", exc)
    await client.close()

asyncio.run(main())
"""


ROOT = str(Path(__file__).resolve().parent.parent)


@pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl binary to make a test certificate"
)
def test_https_verifies_certificates_and_honours_ssl_cert_file(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *(
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=localhost",
            ),
            *("-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )

    async def go() -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nsecret")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ctx)
        url = f"https://localhost:{server.sockets[0].getsockname()[1]}/"

        async def child(env: dict[str, str]) -> str:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _TLS_CHILD, url, env=env, stdout=asyncio.subprocess.PIPE
            )
            out, _ = await proc.communicate()
            return out.decode().strip()

        base = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ROOT}
        refused = await child(base)
        assert refused.startswith("ERROR cannot connect to tls") and "CERTIFICATE" in refused.upper()
        assert await child({**base, "SSL_CERT_FILE": str(cert)}) == "200 secret"
        server.close()
        await server.wait_closed()

    run(go())


# -- what an upstream may send (audit findings 3, 4, 9, 12, 17) ---------------------------------------
def test_an_endless_response_head_is_cut_at_the_cap() -> None:
    """Finding 3: a head of 128 MiB used to cost memory, quadratic CPU and every client's latency."""

    async def go(client: Client) -> None:
        pushed = 0

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal pushed
            await srv.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
            while pushed < 128 * 1024 * 1024:
                writer.write(b"a" * 65536)
                await writer.drain()
                pushed += 65536

        async with Server(handler) as srv:
            with pytest.raises(UpstreamFailed, match="response head over 65536 bytes"):
                await client.open("GET", srv.url, [], b"", Timeouts(first_byte_s=30), "up")
        assert pushed < 8 * 1024 * 1024  # cut within a read or two of the cap, not at the end

    run(_with_client(go))


def test_too_many_response_headers_and_impossible_statuses_are_malformed() -> None:
    """Finding 9: a status of 600 or more used to crash the relay (KeyError in the server)."""

    async def go(client: Client) -> None:
        answers = [
            b"HTTP/1.1 200 OK\r\n"
            + b"".join(b"x-%d: 1\r\n" % i for i in range(300))
            + b"content-length: 0\r\n\r\n",
            b"HTTP/1.1 999 Nope\r\ncontent-length: 0\r\n\r\n",
        ]

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            writer.write(answers.pop(0))
            await writer.drain()

        async with Server(handler) as srv:
            with pytest.raises(UpstreamFailed, match="more than 256 headers"):
                await client.open("GET", srv.url, [], b"", Timeouts(), "up")
            with pytest.raises(UpstreamFailed, match="impossible status 999"):
                await client.open("GET", srv.url, [], b"", Timeouts(), "up")

    run(_with_client(go))


@pytest.mark.parametrize("kind", ["trickled head", "endless 100 Continue"])
def test_first_byte_s_is_a_deadline_for_the_whole_head(kind: str) -> None:
    """Finding 12: a trickled head or endless 1xx answers used to keep the client waiting forever."""

    async def go(client: Client) -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            if kind == "trickled head":
                writer.write(b"HTTP/1.1 200 OK\r\nx-slow: ")
            for _ in range(100):  # 10 s of keeping the connection busy, without ever a whole head
                writer.write(b"a" if kind == "trickled head" else b"HTTP/1.1 100 Continue\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.1)

        async with Server(handler) as srv:
            started = time.monotonic()
            with pytest.raises(UpstreamTimeout, match="did not answer in time"):
                await client.open("GET", srv.url, [], b"", Timeouts(first_byte_s=1, idle_s=1), "up")
            assert time.monotonic() - started < 5  # the 1 s deadline, not the 10 s of trickle

    run(_with_client(go))


def test_control_requests_read_a_bounded_body() -> None:
    """Finding 4: one health probe of an endless body used to buffer 1.6 GiB."""

    async def go(client: Client) -> None:
        pushed = 0

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal pushed
            await srv.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            while pushed < 1024 * 1024 * 1024:
                writer.write(b"10000\r\n" + b"a" * 65536 + b"\r\n")
                await writer.drain()
                pushed += 65536

        async with Server(handler) as srv:
            with pytest.raises(UpstreamFailed, match="answered more than 1048576 bytes"):
                await client.request("GET", srv.url + "/health", [], b"", 5, "probe")
        assert pushed < 32 * 1024 * 1024

    run(_with_client(go))


def test_idle_pooled_connections_are_swept_even_if_their_origin_is_never_used_again() -> None:
    """Finding 17: connections to a node that went away stayed open for good."""

    async def go() -> None:
        client = Client(keepalive_s=0.2)
        try:

            async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                while True:
                    await srv.read_request(reader)
                    writer.write(OK)
                    await writer.drain()

            async with Server(handler) as srv:
                await client.request("GET", srv.url, [], b"", 5, "up")
                assert client._pools  # pooled
                await asyncio.sleep(0.3)
                await client.sweep()
                assert not client._pools  # closed and forgotten
                await asyncio.wait_for(srv.closed.wait(), 5)  # the server saw the connection go
        finally:
            await client.close()

    run(go())


def test_an_address_policy_is_asked_about_every_address_a_name_resolves_to() -> None:
    async def go(client: Client) -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            writer.write(OK)
            await writer.drain()

        async with Server(handler) as srv:
            url = srv.url.replace("127.0.0.1", "localhost")
            with pytest.raises(UpstreamUnreachable, match="which nodes may not use"):
                await client.open("GET", url, [], b"", Timeouts(), "node n", lambda ip: ip.startswith("10."))
            resp = await client.open("GET", url, [], b"", Timeouts(), "node n", lambda ip: ip == "127.0.0.1")
            assert resp.status == 200
            resp.release()

    run(_with_client(go))
