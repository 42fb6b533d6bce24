"""Real HTTP fake OpenAI upstreams (aiohttp servers on 127.0.0.1) running in a thread."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from multidict import CIMultiDict


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Seen:
    path: str
    headers: CIMultiDict[str]  # names are case-insensitive, as in HTTP
    body: dict[str, Any]


@dataclass
class FakeUpstream:
    """An OpenAI-compatible server: answers chat/completions/embeddings, streams on request.

    Behaviour knobs may be changed while it runs: ``delay_s`` before the head, ``status``,
    ``chunks`` and ``chunk_interval_s`` for streams, ``health_status``; ``big_body`` > 0 answers
    with a body of that many bytes (with a length), sent in two halves ``chunk_interval_s``
    apart, and with ``cut_body`` the connection is dropped after the first half.
    """

    name: str = "fake"
    port: int = 0
    host: str = "127.0.0.1"
    delay_s: float = 0.0
    status: int = 200
    chunks: int = 3
    chunk_interval_s: float = 0.0
    health_status: int = 200
    big_body: int = 0
    cut_body: bool = False
    #: Drop the connection of a stream after its first event (a node dying mid-answer).
    cut_stream: bool = False
    seen: list[Seen] = field(default_factory=list)
    cancelled: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"}, status=self.health_status)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.name, "object": "model"}]})

    async def _infer(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw) if raw else {}
        self.seen.append(Seen(request.path_qs, CIMultiDict(request.headers), body))
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if self.status != 200:
                return web.json_response(
                    {"error": {"message": f"{self.name} failing", "type": "server_error"}},
                    status=self.status,
                )
            if self.big_body:
                return await self._big(request)
            if request.path == "/v1/embeddings":
                return web.json_response(
                    {
                        "object": "list",
                        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                        "model": body.get("model"),
                    }
                )
            if body.get("stream"):
                return await self._stream(request, body)
            content = f"hello from {self.name}"
            return web.json_response(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", self.name),
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": content},
                        }
                    ],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
                },
                headers={"X-Upstream": self.name},
            )
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def _big(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = self.big_body
        await resp.prepare(request)
        half = self.big_body // 2
        await resp.write(b"a" * half)
        await asyncio.sleep(self.chunk_interval_s)
        if self.cut_body:
            assert request.transport is not None
            request.transport.close()
            return resp
        await resp.write(b"b" * (self.big_body - half))
        await resp.write_eof()
        return resp

    async def _stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(self.chunks):
            chunk = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": body.get("model", self.name),
                "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}],
                "sent_at": time.time(),
            }
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if self.cut_stream:
                assert request.transport is not None
                request.transport.close()
                return resp
            if self.chunk_interval_s:
                await asyncio.sleep(self.chunk_interval_s)
        done = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": body.get("model", self.name),
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        }
        await resp.write(f"data: {json.dumps(done)}\n\n".encode())
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "choices": [],
                "usage": {
                    "prompt_tokens": 5,
                    "completion_tokens": self.chunks,
                    "total_tokens": 5 + self.chunks,
                },
            }
            await resp.write(f"data: {json.dumps(usage)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def start(self) -> FakeUpstream:
        ready = threading.Event()
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            app.router.add_post(path, self._infer)

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
            loop.run_until_complete(site.start())
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self._runner = runner
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"fake-{self.name}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake upstream did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None


LLAMA_SERVER_STANDIN = Path(__file__).with_name("llama_server.py")


def write_fake_llama_server(directory: Path) -> tuple[Path, Path]:
    """An executable stand-in for llama-server and a dummy model file: ``(binary, model)``."""
    binary = directory / "fake-llama-server"
    binary.write_text(f'#!/bin/sh\nexec {sys.executable} {LLAMA_SERVER_STANDIN} "$@"\n')
    binary.chmod(0o755)
    model = directory / "tiny.gguf"
    model.write_bytes(b"GGUF")
    return binary, model
