"""The upstreams every target is measured against.

* nginx (one worker) answering every POST with the same fixed chat completion, and
  ``/health`` with 200: the fastest possible upstream, so that what we measure is the relay.
* A small SSE server (uvloop + httptools, no framework) that answers a chat completion with
  ``--chunks`` events ``--interval`` seconds apart, then ``data: [DONE]``: slow streams that
  a gateway must hold open by the thousand. Run it as ``python -m bench.upstreams sse``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
from pathlib import Path

import httptools
import orjson

from .procs import Proc, free_port

#: The fixed completion nginx returns (a valid OpenAI chat completion, so LiteLLM parses it).
CHAT_COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "planner",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18},
    }
).decode()

#: The request body every non-streaming client sends.
CHAT_REQUEST = orjson.dumps(
    {"model": "planner", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
).decode()

_NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_body_buffer_size 64k;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /health {{
            default_type application/json;
            return 200 '{{"status":"ok"}}';
        }}
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(found).exists():
        raise FileNotFoundError("nginx is not installed (bench/run.sh installs it with apt-get)")
    return found


def start_nginx(work: Path) -> tuple[Proc, str]:
    """Start nginx on a free port; returns the process and its base URL."""
    port = free_port()
    d = work / "nginx"
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(_NGINX_CONF.format(dir=d, port=port, body=CHAT_COMPLETION))
    proc = Proc("nginx", [nginx_binary(), "-p", str(d), "-c", str(conf)], work)
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(url + "/health", 10)
    return proc, url


def start_sse(work: Path, python: str, chunks: int, interval_s: float) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(
        "sse-upstream",
        [
            python,
            "-m",
            "bench.upstreams",
            "sse",
            "--port",
            str(port),
            "--chunks",
            str(chunks),
            "--interval",
            str(interval_s),
        ],
        work,
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(url + "/health", 10)
    return proc, url


# -- the SSE server ------------------------------------------------------------------------------

_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
_HEALTH = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{"status":"ok"}'


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(i: int) -> bytes:
    return (
        b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
        b'"model":"planner","choices":[{"index":0,"delta":{"content":"tok%d "},"finish_reason":null}]}\n\n'
        % i
    )


class _SSEProtocol(asyncio.Protocol):
    def __init__(self, chunks: int, interval_s: float) -> None:
        self.chunks = chunks
        self.interval_s = interval_s
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_complete(self) -> None:
        assert self.transport is not None
        if self.url.startswith(b"/health"):
            self.transport.write(_HEALTH)
            return
        self.task = asyncio.get_running_loop().create_task(self._stream(self.transport))

    async def _stream(self, t: asyncio.Transport) -> None:
        t.write(_SSE_HEAD + _chunk(_event(0)))
        for i in range(1, self.chunks):
            await asyncio.sleep(self.interval_s)
            if t.is_closing():
                return
            t.write(_chunk(_event(i)))
        t.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


async def _serve_sse(port: int, chunks: int, interval_s: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _SSEProtocol(chunks, interval_s), "127.0.0.1", port, backlog=4096
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.upstreams")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sse", help="serve slow SSE chat completions")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--chunks", type=int, default=50)
    s.add_argument("--interval", type=float, default=0.05)
    args = p.parse_args()
    import uvloop

    uvloop.run(_serve_sse(args.port, args.chunks, args.interval))


if __name__ == "__main__":
    main()
