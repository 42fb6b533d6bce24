"""A scripted stand-in for :class:`rolemesh_gateway.common.http1.Client`, and an ASGI caller.

The gateway, the agent, routes and the registrar all take their HTTP client as an argument
(the seam); this fake answers from a script instead of the network and records every call::

    client = FakeClient()
    client.on("http://a:1", Raise(UpstreamUnreachable("cannot connect to a")))
    client.on("http://b:1/v1/chat/completions", Reply(200, b'{"ok":1}'))
    client.then(Reply(503))  # the next call, whatever its URL, before any per-URL script

A URL script is matched exactly, else by the longest prefix. Its answers are used in order and
the last one repeats. An answer is a :class:`Reply` (buffered ``body``, or SSE ``chunks``,
optionally broken by ``break_with`` after them), a :class:`Raise` (``open`` raises, as when a
node cannot be reached or times out before the head), or a function of the :class:`Call`.

:func:`call_app` drives an ASGI app directly (no sockets) and collects what it sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from rolemesh_gateway.common.errors import RoleMeshError, UpstreamFailed

RawHeaders = list[tuple[bytes, bytes]]


@dataclass
class Call:
    """One request the code under test made."""

    method: str
    url: str
    headers: RawHeaders
    body: bytes
    #: ``Timeouts`` for :meth:`FakeClient.open`, a float for :meth:`FakeClient.request`.
    timeout: Any
    target: str
    #: The name the server's certificate must carry (``server_hostname``), when one was asked.
    server_hostname: str | None = None

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Reply:
    """An answer. With ``chunks`` the body is streamed (no length, as chunked SSE)."""

    status: int = 200
    body: bytes = b""
    headers: Sequence[tuple[bytes, bytes]] = ()
    chunks: Sequence[bytes] | None = None
    #: Raised after every chunk (or instead of the buffered body) was handed over.
    break_with: RoleMeshError | None = None
    #: The head is held back until this event is set (a slow node, a busy slot).
    gate: asyncio.Event | None = None

    @classmethod
    def json(cls, status: int, data: Any, headers: Sequence[tuple[bytes, bytes]] = (), **kw: Any) -> Reply:
        return cls(status, orjson.dumps(data), headers=_typed(b"application/json", headers), **kw)

    @classmethod
    def sse(
        cls, *events: bytes, status: int = 200, headers: Sequence[tuple[bytes, bytes]] = (), **kw: Any
    ) -> Reply:
        return cls(status, headers=_typed(b"text/event-stream", headers), chunks=list(events), **kw)


def _typed(content_type: bytes, headers: Sequence[tuple[bytes, bytes]]) -> RawHeaders:
    """``headers`` with a content-type, unless they carry their own."""
    if any(k.lower() == b"content-type" for k, _ in headers):
        return list(headers)
    return [(b"content-type", content_type), *headers]


@dataclass
class Raise:
    """``open`` fails with this error (nothing of an answer came back)."""

    error: RoleMeshError


Answer = Reply | Raise | Callable[[Call], "Reply | Raise"]


class FakeResponse:
    """What :func:`rolemesh_gateway.common.relay.relay` and the routes read from an answer."""

    def __init__(self, reply: Reply) -> None:
        self.status = reply.status
        self.headers: RawHeaders = [(k.lower(), v) for k, v in reply.headers]
        self._break = reply.break_with
        if reply.chunks is None:
            self._chunks = [reply.body] if reply.body else []
            if not any(k == b"content-length" for k, _ in self.headers):
                self.headers.append((b"content-length", b"%d" % len(reply.body)))
        else:
            self._chunks = list(reply.chunks)
            if not any(k in (b"content-length", b"transfer-encoding") for k, _ in self.headers):
                self.headers.append((b"transfer-encoding", b"chunked"))
        self.content_type = ""
        self.content_length: int | None = None
        for k, v in self.headers:
            if k == b"content-type":
                self.content_type = v.partition(b";")[0].strip().lower().decode("latin-1")
            elif k == b"content-length":
                self.content_length = int(v)
        self.released = False
        #: Bytes handed over so far.
        self.delivered = 0

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.next_chunk():
            parts.append(chunk)
        return b"".join(parts)

    async def next_chunk(self) -> bytes:
        await asyncio.sleep(0)  # a real read yields to the loop
        if self._chunks:
            chunk = self._chunks.pop(0)
            self.delivered += len(chunk)
            return chunk
        if self._break is not None:
            raise self._break
        return b""

    def release(self) -> None:
        self.released = True


class FakeClient:
    """Answers from a script; records every call in :attr:`calls` and every answer in :attr:`responses`."""

    def __init__(self, default: Answer | None = None) -> None:
        self.calls: list[Call] = []
        self.responses: list[FakeResponse] = []
        self.closed = False
        self._default = default
        self._next: list[Answer] = []
        self._by_url: dict[str, list[Answer]] = {}

    # -- the script -------------------------------------------------------------------------
    def on(self, url: str, *answers: Answer) -> FakeClient:
        """Answer requests to ``url`` (exact, or the longest prefix) with ``answers`` in turn."""
        assert answers, "give at least one answer"
        self._by_url[url] = list(answers)
        return self

    def then(self, *answers: Answer) -> FakeClient:
        """Answer the next calls, whatever their URL, with ``answers`` (each used once)."""
        self._next.extend(answers)
        return self

    def urls(self) -> list[str]:
        return [c.url for c in self.calls]

    def all_released(self) -> bool:
        return all(r.released for r in self.responses)

    def _answer(self, call: Call) -> Answer:
        if self._next:
            return self._next.pop(0)
        script = self._by_url.get(call.url)
        if script is None:
            best = max((u for u in self._by_url if call.url.startswith(u)), key=len, default=None)
            script = self._by_url[best] if best is not None else None
        if script is not None:
            return script.pop(0) if len(script) > 1 else script[0]
        if self._default is not None:
            return self._default
        if call.url.endswith("/v1/models"):  # what a server that lists no models answers
            return Reply.json(404, {"error": {"message": "not found"}})
        raise AssertionError(f"FakeClient has no answer scripted for {call.method} {call.url}")

    # -- the Client interface -----------------------------------------------------------------
    async def open(
        self,
        method: str,
        url: str,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
        timeouts: Any,
        target: str,
        allow: Any = None,
        server_hostname: str | None = None,
    ) -> FakeResponse:
        call = Call(method, url, list(headers), body, timeouts, target, server_hostname)
        self.calls.append(call)
        answer = self._answer(call)
        if callable(answer):
            answer = answer(call)
        if isinstance(answer, Raise):
            await asyncio.sleep(0)
            raise answer.error
        if answer.gate is not None:
            await answer.gate.wait()
        resp = FakeResponse(answer)
        self.responses.append(resp)
        return resp

    async def request(
        self,
        method: str,
        url: str,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
        timeout_s: float,
        target: str,
    ) -> tuple[int, bytes]:
        resp = await self.open(method, url, headers, body, timeout_s, target)
        try:
            return resp.status, await resp.read()
        finally:
            resp.release()

    async def sweep(self) -> None:
        return None

    async def close(self) -> None:
        self.closed = True


def broken(target: str = "node") -> UpstreamFailed:
    """The error a real client raises when a node drops the connection mid-answer."""
    return UpstreamFailed(f"{target} closed the connection mid-answer")


# -- the other side: calling an ASGI app directly ---------------------------------------------
@dataclass
class Sent:
    """What an ASGI app sent back, as a client would see it."""

    messages: list[dict[str, Any]] = field(default_factory=list)

    async def __call__(self, message: Any) -> None:
        self.messages.append(dict(message))

    @property
    def started(self) -> bool:
        return any(m["type"] == "http.response.start" for m in self.messages)

    @property
    def status(self) -> int:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        assert len(starts) == 1, f"expected one response head, got {len(starts)}"
        return int(starts[0]["status"])

    @property
    def headers(self) -> RawHeaders:
        return next(m for m in self.messages if m["type"] == "http.response.start")["headers"]

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)

    def header_values(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k == name]

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")

    @property
    def finished(self) -> bool:
        """The last body message said no more is coming (a whole answer, or a told break)."""
        bodies = [m for m in self.messages if m["type"] == "http.response.body"]
        return bool(bodies) and not bodies[-1].get("more_body", False)

    def json(self) -> Any:
        return orjson.loads(self.body)


def receiver(body: bytes = b"", chunks: Sequence[bytes] | None = None) -> Callable[[], Awaitable[Any]]:
    """An ASGI ``receive``: the body (whole, or in ``chunks``), then a wait for a disconnect."""
    parts = list(chunks) if chunks is not None else [body]
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)
    ]
    forever = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await forever.wait()  # the client stays connected
        return {"type": "http.disconnect"}

    return receive


def scope(method: str, path: str, headers: RawHeaders | None = None, query: bytes = b"") -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": query,
        "headers": list(headers or []),
    }


async def call_app(
    app: Callable[..., Awaitable[None]],
    method: str,
    path: str,
    body: bytes | Any = b"",
    headers: RawHeaders | None = None,
    query: bytes = b"",
) -> Sent:
    """One request straight into an ASGI app; ``body`` that is not bytes is sent as JSON."""
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    hdrs = list(headers or [])
    if raw and not any(k == b"content-length" for k, _ in hdrs):
        hdrs.append((b"content-length", b"%d" % len(raw)))
    sent = Sent()
    await app(scope(method, path, hdrs, query), receiver(raw), sent)
    return sent


def run(coro: Awaitable[Any], timeout_s: float = 20) -> Any:
    """Run a test coroutine in a fresh loop, bounded so a hang fails instead of stalling."""

    async def main() -> Any:
        return await asyncio.wait_for(coro, timeout_s)

    return asyncio.run(main())
