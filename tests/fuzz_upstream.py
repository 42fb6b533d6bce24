"""A raw asyncio upstream for the property tests: every byte it answers comes from a script.

The gateway's upstream client must survive whatever an upstream sends: odd status lines and
headers, every body framing, truncations, extra bytes after an answer, a second answer, slow
or silent phases. :class:`FuzzUpstream` listens on ``127.0.0.1:0`` in a thread of its own and
answers each request by the :class:`Script` named in the request's ``x-fuzz-script`` header
(registered with :meth:`FuzzUpstream.add`); without one it answers a plain chat completion.

Every answer it makes carries ``x-fake-upstream: 1`` as its first header, so that a client of
the gateway can tell an answer the gateway relayed from one the gateway made itself. Bodies
carry the request's ``x-fuzz-marker`` header value, so that a client can tell whether it got
its own answer. Every wait is bounded (``HOLD_MAX_S``).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass, field
from typing import Literal

import httptools

#: A connection told to stay silent is closed by us after this long at most.
HOLD_MAX_S = 15.0
MARK = b"x-fake-upstream"

Framing = Literal["length", "chunked", "close"]
End = Literal["keep", "close", "hold"]


@dataclass(frozen=True)
class Script:
    """How to answer one request, byte by byte.

    ``{marker}`` in ``status_line``, header values and body parts is replaced by the request's
    marker. ``parts`` are ``(delay_s, bytes)``: each part is written after its delay, framed
    as ``framing`` says. ``length_delta`` is added to the declared Content-Length (positive: a
    truncated body; negative: bytes past the end). ``trailing`` is written with the last part,
    in the same write: bytes nobody asked for (a second answer, garbage).
    """

    status_line: bytes = b"HTTP/1.1 200 OK"
    headers: tuple[tuple[bytes, bytes], ...] = ((b"content-type", b"application/json"),)
    framing: Framing = "length"
    parts: tuple[tuple[float, bytes], ...] = ((0.0, b'{"marker": "{marker}"}'),)
    interim: bool = False
    head_delay_s: float = 0.0
    #: Write the head in this many pieces, ``trickle_s`` apart (a trickled head).
    head_pieces: int = 1
    trickle_s: float = 0.0
    length_delta: int = 0
    #: Chunked only: send the last-chunk (``0\\r\\n\\r\\n``) that ends the body.
    last_chunk: bool = True
    trailing: bytes = b""
    #: After the answer: keep the connection for the next request, close it, or hold it silent.
    end: End = "keep"

    def silent_phases(self) -> list[float]:
        """Every pause the answer makes, in order (what the gateway's timeouts are measured on)."""
        pauses = [self.head_delay_s + self.trickle_s * (self.head_pieces - 1)]
        pauses += [delay for delay, _ in self.parts]
        return pauses


def _fill(data: bytes, marker: bytes) -> bytes:
    return data.replace(b"{marker}", marker)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def default_answer(marker: bytes) -> bytes:
    """A plain chat completion that names the marker."""
    body = (
        b'{"id":"chatcmpl-fuzz","object":"chat.completion","created":0,"model":"fz","choices":'
        b'[{"index":0,"finish_reason":"stop","message":{"role":"assistant","content":"' + marker + b'"}}]}'
    )
    return (
        b"HTTP/1.1 200 OK\r\nx-fake-upstream: 1\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n" % len(body)
    ) + body


@dataclass
class _Request:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""


class _Conn(asyncio.Protocol):
    def __init__(self, up: FuzzUpstream) -> None:
        self.up = up
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.current = _Request()
        self.queue: asyncio.Queue[_Request | None] = asyncio.Queue()
        self.lost = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    # asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.up.connections += 1
        self.up.transports.add(transport)  # type: ignore[arg-type]
        self.task = asyncio.get_running_loop().create_task(self.serve())

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.up.bad_requests += 1
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()
        self.queue.put_nowait(None)
        if self.transport is not None:
            self.up.transports.discard(self.transport)

    # httptools
    def on_message_begin(self) -> None:
        self.current = _Request()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.current.body += body

    def on_message_complete(self) -> None:
        self.up.requests += 1
        self.queue.put_nowait(self.current)

    # answering
    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing() and data:
            self.transport.write(data)

    async def pause(self, seconds: float) -> bool:
        """Sleep, unless the peer goes away first (then False)."""
        if seconds <= 0:
            return not self.lost.is_set()
        try:
            await asyncio.wait_for(self.lost.wait(), seconds)
        except TimeoutError:
            return True
        return False

    async def serve(self) -> None:
        try:
            while True:
                try:
                    req = await asyncio.wait_for(self.queue.get(), HOLD_MAX_S)
                except TimeoutError:
                    break
                if req is None:  # the peer went away
                    break
                marker = req.headers.get(b"x-fuzz-marker", b"none")
                script = self.up.scripts.get(req.headers.get(b"x-fuzz-script", b"").decode("latin-1"))
                if script is None:
                    self.write(default_answer(marker))
                    continue
                if not await self.answer(script, marker):
                    break
        finally:
            self.close()

    async def answer(self, s: Script, marker: bytes) -> bool:
        """Play one script; False when the connection is done with."""
        if s.interim:
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if not await self.pause(s.head_delay_s):
            return False
        parts = [(delay, _fill(data, marker)) for delay, data in s.parts]
        head = [_fill(s.status_line, marker), b"\r\n", MARK, b": 1\r\n"]
        for name, value in s.headers:
            head += [name, b": ", _fill(value, marker), b"\r\n"]
        if s.framing == "length":
            size = sum(len(p) for _, p in parts) + s.length_delta
            head.append(b"content-length: %d\r\n" % max(0, size))
        elif s.framing == "chunked":
            head.append(b"transfer-encoding: chunked\r\n")
        if s.end == "close":
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        raw = b"".join(head)
        step = max(1, -(-len(raw) // s.head_pieces))
        for i in range(0, len(raw), step):
            if i and not await self.pause(s.trickle_s):
                return False
            self.write(raw[i : i + step])
        for n, (delay, data) in enumerate(parts):
            if not await self.pause(delay):
                return False
            out = _chunk(data) if s.framing == "chunked" and data else data
            if n == len(parts) - 1:
                if s.framing == "chunked" and s.last_chunk:
                    out += b"0\r\n\r\n"
                out += s.trailing
            self.write(out)
        if not parts:
            self.write((b"0\r\n\r\n" if s.framing == "chunked" and s.last_chunk else b"") + s.trailing)
        if s.end == "close" or s.framing == "close":
            return False
        if s.end == "hold":
            await self.pause(HOLD_MAX_S)
            return False
        return True


class FuzzUpstream:
    """The scripted upstream in a background thread; :meth:`stop` closes everything."""

    def __init__(self) -> None:
        self.port = 0
        self.scripts: dict[str, Script] = {}
        self.connections = 0
        self.requests = 0
        self.bad_requests = 0
        self.transports: set[asyncio.Transport] = set()
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, script: Script) -> str:
        """Register a script; returns the id to send as ``x-fuzz-script``."""
        sid = f"s{next(self._ids)}"
        self.scripts[sid] = script
        return sid

    def close_soon(self, transport: asyncio.Transport) -> None:
        """Close one of our connections (from any thread)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(transport.abort)

    def start(self) -> FuzzUpstream:
        ready = threading.Event()

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            self._server = loop.run_until_complete(loop.create_server(lambda: _Conn(self), "127.0.0.1", 0))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._close_all())
            loop.close()

        self._thread = threading.Thread(target=run, name="fuzz-upstream", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fuzz upstream did not start")
        return self

    async def _close_all(self) -> None:
        for t in list(self.transports):
            t.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None
