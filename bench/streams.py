"""Streaming load: N concurrent SSE chat completions held to completion.

Run as ``python -m bench.streams --url URL --streams N --chunks C``; prints one JSON line.
A raw uvloop + httptools client (no client library overhead, so the load generator is not
what limits a 2-core machine). A stream counts as completed when it got status 200, exactly
``--chunks`` data events, ``data: [DONE]`` and a clean end of the chunked body; anything
else (connect error, other status, SSE error event, cut, timeout) is an error.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools
import orjson


@dataclass
class _Counters:
    open_now: int = 0
    peak_open: int = 0
    events: int = 0
    completed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    durations: list[float] = field(default_factory=list)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class _StreamProtocol(asyncio.Protocol):
    def __init__(self, done: asyncio.Future[str], counters: _Counters) -> None:
        self.done = done
        self.c = counters
        self.parser = httptools.HttpResponseParser(self)
        self.events = 0
        self.tail = b""
        self.saw_done = False
        self.saw_error = False
        self.held = False

    # httptools callbacks
    def on_headers_complete(self) -> None:
        if self.parser.get_status_code() != 200:
            self._finish(f"status {self.parser.get_status_code()}")
            return
        self.held = True
        self.c.open_now += 1
        self.c.peak_open = max(self.c.peak_open, self.c.open_now)

    def on_body(self, body: bytes) -> None:
        data = self.tail + body
        # Events end with a blank line; keep the last partial event for the next read.
        head, sep, self.tail = data.rpartition(b"\n\n")
        if not sep:
            self.tail = data
            return
        for event in head.split(b"\n\n"):
            if event == b"data: [DONE]":
                self.saw_done = True
            elif event.startswith(b'data: {"error"') or event.startswith(b"event: error"):
                self.saw_error = True
            elif event.startswith(b"data: "):
                self.events += 1

    def on_message_complete(self) -> None:
        if self.saw_error:
            self._finish("sse error event")
        elif not self.saw_done:
            self._finish("no [DONE]")
        else:
            self._finish("")

    # asyncio callbacks
    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._finish(f"bad http: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish("connection lost")

    def _finish(self, error: str) -> None:
        if self.done.done():
            return
        if self.held:
            self.c.open_now -= 1
            self.held = False
        self.c.events += self.events
        self.done.set_result(error)


async def _one(host: str, port: int, request: bytes, chunks: int, timeout_s: float, c: _Counters) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[str] = loop.create_future()
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(timeout_s):
            transport, proto = await loop.create_connection(lambda: _StreamProtocol(done, c), host, port)
            try:
                transport.write(request)
                error = await done
            finally:
                transport.close()
    except TimeoutError:
        c.error("timeout")
        return
    except OSError as exc:
        c.error(f"connect: {exc.strerror or exc}")
        return
    if not error and proto.events != chunks:
        error = f"got {proto.events} of {chunks} chunks"
    if error:
        c.error(error)
    else:
        c.completed += 1
        c.durations.append(time.monotonic() - t0)


async def run(
    url: str, streams: int, chunks: int, timeout_s: float, key: str, model: str
) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    body = orjson.dumps(
        {"model": model, "stream": True, "messages": [{"role": "user", "content": "Tell me a story."}]}
    )
    request = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {key}\r\nAccept: text/event-stream\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    c = _Counters()
    t0 = time.monotonic()
    await asyncio.gather(*(_one(host, port, request, chunks, timeout_s, c) for _ in range(streams)))
    wall = time.monotonic() - t0
    return {
        "streams": streams,
        "completed": c.completed,
        "errors": sum(c.errors.values()),
        "error_kinds": c.errors,
        "peak_open": c.peak_open,
        "events": c.events,
        "wall_s": wall,
        "chunks_per_s": c.events / wall if wall else 0.0,
        "p50_stream_s": statistics.median(c.durations) if c.durations else 0.0,
        "max_stream_s": max(c.durations) if c.durations else 0.0,
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.streams")
    p.add_argument("--url", required=True, help="full URL of /v1/chat/completions")
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--chunks", type=int, default=50, help="data events each stream must carry")
    p.add_argument("--timeout", type=float, default=60.0, help="per-stream limit, seconds")
    p.add_argument("--key", default="")
    p.add_argument("--model", default="planner")
    args = p.parse_args()
    import uvloop

    result = uvloop.run(run(args.url, args.streams, args.chunks, args.timeout, args.key, args.model))
    print(orjson.dumps(result).decode(), flush=True)


if __name__ == "__main__":
    main()
