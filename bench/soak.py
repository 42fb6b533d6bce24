"""The soak case: mixed load for a long while, a node killed and restarted every minute.

``bash bench/run.sh --cases soak [--soak-s 600]`` runs it (not part of the default cases, nor of
``--quick``). Three processes kinds, all on 127.0.0.1:

* the gateway, as ``rolemesh-gateway`` runs it (``python -m rolemesh_gateway.gateway.cli``), with
  one ``discovered`` alias and ``limits.write_timeout_s: 5``;
* ``python -m bench.soak node``: small fake nodes (uvloop, asyncio streams) that register and
  heartbeat with the node key and serve chat completions and SSE streams; one of them is
  SIGKILLed every minute (from 30 s on) and started again on the same port 3 s later;
* ``python -m bench.soak load``: the clients, raw HTTP/1.1 on asyncio streams: plain chat,
  SSE streams read to the end, clients that vanish mid-stream, readers that stall (a tiny
  receive buffer and no reads: the gateway must cut them after ``write_timeout_s``), and bad
  inputs (bad JSON, unknown model, wrong or missing key, a ``model`` that is not a string).

Meanwhile the gateway's RSS and open file descriptors are read from ``/proc`` every second. Each
failed request is then judged: it is the injected failure's doing when it overlapped the
outage of the node that was killed (and was served by that node, when the client knows). The
criteria: no request lost for any other reason, and RSS and fds flat (median of minute 2 versus
median of the last minute, growth under 10%). Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .procs import Proc, free_port
from .targets import CLIENT_KEY, NODE_KEY, REPO, source_env

ROLE = "writer"
NODES = 3
KILL_FIRST_S = 30.0
KILL_EVERY_S = 60.0
DOWN_S = 3.0
WRITE_TIMEOUT_S = 5.0
#: Failure records kept by the load generator (counts are always exact).
MAX_RECORDS = 5000
#: After the load: long enough for every idle connection to time out, client and upstream.
SETTLE_S = 45.0
#: Criteria (the issue's): growth of RSS and fds between minute 2 and the end.
MAX_GROWTH = 0.10


# =============================================================================================
# The fake node
# =============================================================================================
def _node_answer(node_id: str, status: int, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 %d X\r\ncontent-type: %s\r\nx-soak-node: %s\r\ncontent-length: %d\r\n\r\n"
        % (status, content_type, node_id.encode(), len(body))
    ) + body


async def _node_serve(node_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One connection: requests one after another (keep-alive)."""
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            line, _, rest = head.partition(b"\r\n")
            headers = {}
            for h in rest.split(b"\r\n"):
                k, _, v = h.partition(b":")
                headers[k.strip().lower()] = v.strip()
            length = int(headers.get(b"content-length", b"0") or 0)
            body = await reader.readexactly(length) if length else b""
            path = line.split(b" ")[1] if b" " in line else b"/"
            if path.startswith(b"/health"):
                writer.write(_node_answer(node_id, 200, b'{"status":"ok"}'))
                continue
            if headers.get(b"x-rolemesh-node-key") != NODE_KEY.encode():
                writer.write(_node_answer(node_id, 401, b'{"error":{"message":"node key"}}'))
                continue
            try:
                req = orjson.loads(body) if body else {}
            except orjson.JSONDecodeError:
                writer.write(_node_answer(node_id, 400, b'{"error":{"message":"bad json"}}'))
                continue
            if not req.get("stream"):
                answer = orjson.dumps(
                    {
                        "id": "chatcmpl-soak",
                        "object": "chat.completion",
                        "model": req.get("model"),
                        "node": node_id,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}],
                    }
                )
                writer.write(_node_answer(node_id, 200, answer))
                await writer.drain()
                continue
            soak = req.get("soak") or {}
            chunks, interval, pad = (
                int(soak.get("chunks", 20)),
                float(soak.get("interval", 0.05)),
                int(soak.get("pad", 0)),
            )
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-soak-node: %s\r\n"
                b"transfer-encoding: chunked\r\n\r\n" % node_id.encode()
            )
            filler = "x" * pad
            for i in range(chunks):
                event = (
                    b"data: "
                    + orjson.dumps({"choices": [{"delta": {"content": f"t{i} {filler}"}}], "node": node_id})
                    + b"\n\n"
                )
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()  # a stalled reader stalls us too, as it would llama-server
                if interval:
                    await asyncio.sleep(interval)
            done = b"data: [DONE]\n\n"
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


async def _call(host: str, port: int, method: str, path: str, body: dict[str, Any], key: str) -> int:
    """One request on a fresh connection; the status (the node's control calls are rare)."""
    raw = orjson.dumps(body)
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(
                f"{method} {path} HTTP/1.1\r\nhost: {host}:{port}\r\nx-rolemesh-node-key: {key}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(raw)}\r\n"
                "connection: close\r\n\r\n".encode()
                + raw
            )
            head = await reader.readuntil(b"\r\n\r\n")
            return int(head.split(b" ", 2)[1])
        finally:
            writer.close()


async def node_main(args: argparse.Namespace) -> None:
    server = await asyncio.start_server(
        lambda r, w: _node_serve(args.node_id, r, w), "127.0.0.1", args.port, reuse_address=True
    )
    gw_host, gw_port = args.gateway.rsplit("//", 1)[1].split(":")
    reg = {"node_id": args.node_id, "base_url": f"http://127.0.0.1:{args.port}", "roles": [ROLE]}
    registered = False
    async with server:
        while True:  # until SIGKILL or SIGTERM
            try:
                if not registered:
                    registered = await _call(
                        gw_host, int(gw_port), "POST", "/v1/nodes/register", reg, NODE_KEY
                    ) in (200, 201)
                    if registered:
                        print("registered", flush=True)
                else:
                    beat = {"node_id": args.node_id}
                    registered = (
                        await _call(gw_host, int(gw_port), "POST", "/v1/nodes/heartbeat", beat, NODE_KEY)
                        != 404
                    )
            except (OSError, TimeoutError, ValueError, IndexError) as exc:
                print(f"gateway call failed: {exc!r}", file=sys.stderr, flush=True)
            await asyncio.sleep(args.heartbeat)


# =============================================================================================
# The clients
# =============================================================================================
@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    failed: int = 0


@dataclass
class Load:
    host: str
    port: int
    end: float
    tallies: dict[str, Tally] = field(default_factory=lambda: collections.defaultdict(Tally))
    failures: list[dict[str, Any]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def fail(self, kind: str, t0: float, what: str, node: str | None = None, detail: str = "") -> None:
        """Count a failure; keep its record (kind, when, which node, what the client saw)."""
        self.tallies[kind].failed += 1
        if len(self.failures) < MAX_RECORDS:
            record = {"kind": kind, "t0": t0, "t1": time.monotonic(), "node": node, "what": what}
            self.failures.append({**record, "detail": detail[:200]})

    def request(self, path: str, body: bytes, key: str | None = CLIENT_KEY, close: bool = False) -> bytes:
        auth = f"authorization: Bearer {key}\r\n" if key else ""
        conn = "connection: close\r\n" if close else ""
        return (
            f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n{auth}{conn}"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode() + body


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes]]:
    head = await reader.readuntil(b"\r\n\r\n")
    first, _, rest = head.partition(b"\r\n")
    headers = {}
    for line in rest.split(b"\r\n"):
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip()
    return int(first.split(b" ", 2)[1]), headers


async def read_body(reader: asyncio.StreamReader, headers: dict[bytes, bytes]) -> AsyncIterator[bytes]:
    """The body as it arrives (length, chunked, or until close); IncompleteReadError when cut."""
    if b"content-length" in headers:
        n = int(headers[b"content-length"])
        if n:
            yield await reader.readexactly(n)
    elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    else:
        while chunk := await reader.read(65536):
            yield chunk


CHAT = orjson.dumps({"model": ROLE, "messages": [{"role": "user", "content": "hi"}]})


def _stream_body(**soak: float) -> bytes:
    return orjson.dumps(
        {"model": ROLE, "stream": True, "messages": [{"role": "user", "content": "hi"}], "soak": soak}
    )


async def plain_worker(load: Load, think_s: float) -> None:
    """Non-streamed chat on one keep-alive connection (a new one after any failure)."""
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    while time.monotonic() < load.end:
        t0 = time.monotonic()
        load.tallies["plain chat"].sent += 1
        node = None
        try:
            async with asyncio.timeout(30):
                if conn is None:
                    conn = await asyncio.open_connection(load.host, load.port)
                reader, writer = conn
                writer.write(load.request("/v1/chat/completions", CHAT))
                status, headers = await read_head(reader)
                node = headers.get(b"x-soak-node", b"").decode() or None
                body = b"".join([c async for c in read_body(reader, headers)])
            if status == 200 and b'"node"' in body:
                load.tallies["plain chat"].ok += 1
                load.latencies.append(time.monotonic() - t0)
            else:
                load.fail("plain chat", t0, f"status {status}", node, body.decode(errors="replace"))
            if headers.get(b"connection", b"").lower() == b"close":
                conn[1].close()
                conn = None
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            load.fail("plain chat", t0, f"{exc.__class__.__name__}", node)
            if conn is not None:
                conn[1].close()
            conn = None
        await asyncio.sleep(think_s)
    if conn is not None:
        conn[1].close()


async def stream_worker(load: Load, chunks: int, interval_s: float) -> None:
    """SSE streams read to the end: all events and ``[DONE]``, on a fresh connection each."""
    body = _stream_body(chunks=chunks, interval=interval_s)
    while time.monotonic() < load.end:
        t0 = time.monotonic()
        load.tallies["SSE stream"].sent += 1
        node, events, done, error = None, 0, False, False
        writer = None
        try:
            async with asyncio.timeout(30 + chunks * interval_s):
                reader, writer = await asyncio.open_connection(load.host, load.port)
                writer.write(load.request("/v1/chat/completions", body, close=True))
                status, headers = await read_head(reader)
                node = headers.get(b"x-soak-node", b"").decode() or None
                text = b""
                async for chunk in read_body(reader, headers):
                    text += chunk
                    *complete, text = text.split(b"\n\n")
                    for ev in complete:
                        if ev == b"data: [DONE]":
                            done = True
                        elif ev.startswith(b'data: {"error"'):
                            error = True
                        elif ev.startswith(b"data: "):
                            events += 1
            if status == 200 and done and events == chunks and not error:
                load.tallies["SSE stream"].ok += 1
            elif status != 200:
                load.fail("SSE stream", t0, f"status {status}", node)
            else:
                load.fail(
                    "SSE stream",
                    t0,
                    "error event" if error else f"ended after {events} of {chunks} events",
                    node,
                )
        except asyncio.IncompleteReadError:
            load.fail("SSE stream", t0, f"cut after {events} of {chunks} events", node)
        except (OSError, TimeoutError, ValueError) as exc:
            load.fail("SSE stream", t0, exc.__class__.__name__, node)
        finally:
            if writer is not None:
                writer.close()


async def vanish_worker(load: Load, pause_s: float) -> None:
    """Start a long stream, read two events, then go: a reset or a plain close, in turn."""
    body = _stream_body(chunks=200, interval=0.05)
    n = 0
    while time.monotonic() < load.end:
        t0 = time.monotonic()
        n += 1
        load.tallies["vanishing client"].sent += 1
        writer = None
        try:
            async with asyncio.timeout(15):
                reader, writer = await asyncio.open_connection(load.host, load.port)
                writer.write(load.request("/v1/chat/completions", body, close=True))
                status, headers = await read_head(reader)
                seen = b""
                async for chunk in read_body(reader, headers):
                    seen += chunk
                    if seen.count(b"\n\n") >= 2:
                        break
            if status == 200:
                load.tallies["vanishing client"].ok += 1  # it got its start; then left on purpose
            else:
                load.fail(
                    "vanishing client",
                    t0,
                    f"status {status}",
                    headers.get(b"x-soak-node", b"").decode() or None,
                )
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            load.fail("vanishing client", t0, exc.__class__.__name__)
        finally:
            if writer is not None:
                if n % 2:
                    writer.transport.abort()
                else:
                    writer.close()
        await asyncio.sleep(pause_s)


async def stall_worker(load: Load, hold_s: float) -> None:
    """Ask for a 20 MB stream through a 4 KiB receive buffer and read nothing for ``hold_s``:
    the gateway must end it (``limits.write_timeout_s``). Then read what is left: a stream that
    was cut ends without ``[DONE]``; one that was not flows again and completes."""
    body = _stream_body(chunks=5000, interval=0.0, pad=4000)
    loop = asyncio.get_running_loop()
    while time.monotonic() < load.end:
        t0 = time.monotonic()
        load.tallies["stalled reader"].sent += 1
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        writer = None
        try:
            async with asyncio.timeout(hold_s + 60):
                await loop.sock_connect(sock, (load.host, load.port))
                # A small reader limit: the transport stops reading at 2x this, the window closes.
                reader, writer = await asyncio.open_connection(sock=sock, limit=8192)
                writer.write(load.request("/v1/chat/completions", body, close=True))
                await asyncio.sleep(hold_s)
                tail = b""
                while chunk := await reader.read(65536):
                    tail = (tail + chunk)[-64:]
            if b"data: [DONE]" in tail:
                load.fail("stalled reader", t0, f"not cut: the stream completed after a {hold_s:g}s stall")
            else:
                load.tallies["stalled reader"].ok += 1
        except (OSError, TimeoutError) as exc:
            load.fail("stalled reader", t0, exc.__class__.__name__)
        finally:
            if writer is not None:
                writer.close()
            else:
                sock.close()
        await asyncio.sleep(0.5)


#: (what, body, key, expected status): bad inputs the gateway must refuse, never pass on.
BAD_INPUTS: list[tuple[str, bytes, str | None, int]] = [
    ("bad JSON", b'{"model": "writer", ', CLIENT_KEY, 400),
    ("unknown model", orjson.dumps({"model": "no-such-model", "messages": []}), CLIENT_KEY, 404),
    ("wrong key", CHAT, "wrong-key", 401),
    ("no key", CHAT, None, 401),
    ("model not a string", orjson.dumps({"model": 7, "messages": []}), CLIENT_KEY, 400),
    ("body not an object", b"[1, 2]", CLIENT_KEY, 400),
]


async def bad_worker(load: Load, think_s: float) -> None:
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    i = 0
    while time.monotonic() < load.end:
        what, body, key, expected = BAD_INPUTS[i % len(BAD_INPUTS)]
        i += 1
        t0 = time.monotonic()
        load.tallies["bad input"].sent += 1
        try:
            async with asyncio.timeout(15):
                if conn is None:
                    conn = await asyncio.open_connection(load.host, load.port)
                reader, writer = conn
                writer.write(load.request("/v1/chat/completions", body, key))
                status, headers = await read_head(reader)
                answer = b"".join([c async for c in read_body(reader, headers)])
            if status == expected and answer.startswith(b'{"error":'):
                load.tallies["bad input"].ok += 1
            else:
                load.fail("bad input", t0, f"{what}: status {status}, expected {expected}")
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            load.fail("bad input", t0, f"{what}: {exc.__class__.__name__}")
            if conn is not None:
                conn[1].close()
            conn = None
        await asyncio.sleep(think_s)
    if conn is not None:
        conn[1].close()


async def load_main(args: argparse.Namespace) -> None:
    host, port = args.gateway.rsplit("//", 1)[1].split(":")
    load = Load(host, int(port), time.monotonic() + args.duration)
    started = time.monotonic()
    workers = [plain_worker(load, 0.02) for _ in range(args.plain)]
    workers += [stream_worker(load, 20, 0.05) for _ in range(args.streams)]
    workers += [vanish_worker(load, 0.3) for _ in range(args.vanish)]
    workers += [stall_worker(load, WRITE_TIMEOUT_S + 4) for _ in range(args.stall)]
    workers += [bad_worker(load, 0.05) for _ in range(args.bad)]

    async def progress() -> None:
        while time.monotonic() < load.end:
            await asyncio.sleep(10)
            line = {k: (t.sent, t.ok, t.failed) for k, t in load.tallies.items()}
            print(f"t={time.monotonic() - started:.0f}s {line}", file=sys.stderr, flush=True)

    async with asyncio.timeout(args.duration + 120):  # every worker is bounded; this bounds them all
        await asyncio.gather(progress(), *workers)
    lat = sorted(load.latencies)
    result = {
        "tallies": {k: vars(t) for k, t in load.tallies.items()},
        "failures": load.failures,
        "plain_p50_ms": 1000 * statistics.median(lat) if lat else None,
        "plain_p99_ms": 1000 * lat[int(len(lat) * 0.99)] if lat else None,
        "seconds": time.monotonic() - started,
    }
    Path(args.out).write_bytes(orjson.dumps(result))  # noqa: ASYNC240 - once, at the very end


# =============================================================================================
# The run (called by bench.harness) and its report
# =============================================================================================
def _fds(pid: int, port: int) -> tuple[int, int, int]:
    """``(open fds, client connections, upstream connections)`` of the gateway, from ``/proc``:
    its socket inodes matched against the kernel's TCP table (the listening socket in neither)."""
    inodes: set[str] = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0, 0, 0
    for name in names:
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{name}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    clients = upstream = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f, None)
            for line in f:
                cols = line.split()
                if len(cols) < 10 or cols[9] not in inodes or cols[3] == "0A":  # 0A: LISTEN
                    continue
                if int(cols[1].rsplit(":", 1)[1], 16) == port:
                    clients += 1
                else:
                    upstream += 1
    return len(names), clients, upstream


@dataclass
class Kill:
    node: str
    at: float
    up: float | None = None


class SoakRun:
    def __init__(
        self, work: Path, python: str, duration_s: float, say: Callable[[str], None], src: Path | None
    ) -> None:
        self.work, self.python, self.duration_s, self.say, self.src = work, python, duration_s, say, src
        self.procs: dict[str, Proc] = {}
        self.node_ports = {f"soak-node-{i + 1}": free_port() for i in range(NODES)}
        self.kills: list[Kill] = []
        #: (t, RSS MiB, fds, client connections, upstream connections), every second.
        self.samples: list[tuple[float, float, int, int, int]] = []
        self.port = 0

    def _start_gateway(self) -> tuple[Proc, str]:
        config = {
            "version": 1,
            "default_model": ROLE,
            "auth": {"client_api_keys": [CLIENT_KEY], "node_api_keys": [NODE_KEY]},
            "timeouts": {"connect_s": 1, "first_byte_s": 10, "idle_s": 5},
            "limits": {"write_timeout_s": WRITE_TIMEOUT_S},
            "nodes": {"stale_after_s": 5},
            "models": {
                ROLE: {"type": "discovered", "role": ROLE, "strategy": "round_robin", "max_attempts": 3}
            },
        }
        cfg = self.work / "soak-gateway.yaml"
        cfg.write_text(json.dumps(config, indent=2))
        port = free_port()
        env, cwd = source_env(self.src)
        proc = Proc(
            "soak-gateway",
            [
                self.python,
                "-m",
                "rolemesh_gateway.gateway.cli",
                "--config",
                str(cfg),
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            self.work,
            env=env,
            cwd=cwd,
        )
        url = f"http://127.0.0.1:{port}"
        proc.wait_http(url + "/health", 30)
        self.port = port
        return proc, url

    def _start_node(self, node_id: str, gateway: str, n: int) -> Proc:
        proc = Proc(
            f"{node_id}-run{n}",
            [
                self.python,
                "-m",
                "bench.soak",
                "node",
                "--gateway",
                gateway,
                "--node-id",
                node_id,
                "--port",
                str(self.node_ports[node_id]),
                "--heartbeat",
                "1",
            ],
            self.work,
            cwd=str(REPO),
            stdout_pipe=True,
        )
        line = proc.readline(timeout_s=20)
        if not line.startswith("registered"):
            proc.stop()
            raise RuntimeError(f"node {node_id} did not register:\n{proc.tail()}")
        return proc

    def _sample(self, gw: Proc, t0: float) -> None:
        self.samples.append((time.monotonic() - t0, gw.rss_mb(), *_fds(gw.pid, self.port)))

    def run(self) -> dict[str, Any]:
        gw, url = self._start_gateway()
        self.procs["gateway"] = gw
        runs = collections.Counter[str]()
        try:
            for node_id in self.node_ports:
                runs[node_id] += 1
                self.procs[node_id] = self._start_node(node_id, url, runs[node_id])
            out = self.work / "soak-load.json"
            load = Proc(
                "soak-load",
                [
                    self.python,
                    "-m",
                    "bench.soak",
                    "load",
                    "--gateway",
                    url,
                    "--duration",
                    str(self.duration_s),
                    "--out",
                    str(out),
                ],
                self.work,
                cwd=str(REPO),
            )
            self.procs["load"] = load
            t0 = time.monotonic()
            self.say(
                f"soak: {self.duration_s:g}s of mixed load on {url}; a node killed every {KILL_EVERY_S:g}s"
            )
            next_kill, victim = t0 + KILL_FIRST_S, 0
            deadline = t0 + self.duration_s + 150
            while load.alive() and time.monotonic() < deadline:
                self._sample(gw, t0)
                now = time.monotonic()
                if now >= next_kill and now < t0 + self.duration_s - 10:
                    node_id = list(self.node_ports)[victim % NODES]
                    victim += 1
                    next_kill += KILL_EVERY_S
                    kill = Kill(node_id, now - t0)
                    self.kills.append(kill)
                    node = self.procs[node_id]
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(node.pid, signal.SIGKILL)
                    node.stop()
                    self.say(f"soak t={kill.at:.0f}s: SIGKILLed {node_id}")
                    end_down = time.monotonic() + DOWN_S
                    while time.monotonic() < end_down:
                        time.sleep(0.25)
                        self._sample(gw, t0)
                    runs[node_id] += 1
                    self.procs[node_id] = self._start_node(node_id, url, runs[node_id])
                    kill.up = time.monotonic() - t0
                    self.say(f"soak t={kill.up:.0f}s: {node_id} registered again")
                if int(now - t0) % 60 == 0:
                    _, rss, fds, _, _ = self.samples[-1]
                    self.say(f"soak t={now - t0:.0f}s: gateway RSS {rss:.1f} MiB, {fds} fds")
                time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
            if load.alive():
                raise TimeoutError(
                    f"the load generator still runs {self.duration_s + 150:g}s after the start"
                )
            if load.popen.returncode != 0 or not out.exists():
                raise RuntimeError(f"the load generator failed ({load.popen.returncode}):\n{load.tail()}")
            result: dict[str, Any] = json.loads(out.read_text())
            result["gateway_cpu_s"] = gw.cpu_s()
            # At rest: once every idle connection has timed out (clients: limits.keepalive_s, 5 s;
            # upstream: the pool's 30 s and its 10 s sweep), only a leak is left.
            settle_end = time.monotonic() + SETTLE_S
            while time.monotonic() < settle_end:
                self._sample(gw, t0)
                time.sleep(1.0)
            log = (self.work / "soak-gateway.log").read_text(errors="replace")
            (self.work / "soak-samples.json").write_text(json.dumps(self.samples))
        finally:
            for proc in self.procs.values():
                proc.stop()
        result["t0_monotonic"] = t0
        return self._judge(result, log)

    # -- judging ---------------------------------------------------------------------------------
    def _injected(self, failure: dict[str, Any], t0: float) -> bool:
        """Did this request overlap the outage of a killed node (and, if known, was it that node's)?"""
        start, end = failure["t0"] - t0, failure["t1"] - t0
        for k in self.kills:
            up = (k.up if k.up is not None else k.at + DOWN_S) + 2.0
            if start <= up and end >= k.at - 0.5 and failure["node"] in (None, k.node):
                return True
        return False

    def _judge(self, r: dict[str, Any], log: str) -> dict[str, Any]:
        t0 = r["t0_monotonic"]
        causes: collections.Counter[tuple[str, str, str]] = collections.Counter()
        samples: list[dict[str, Any]] = []
        for f in r["failures"]:
            blame = "injected: node killed" if self._injected(f, t0) else "other"
            causes[(blame, f["kind"], f["what"])] += 1
            if blame == "other" and len(samples) < 5:
                samples.append({**f, "t0": f["t0"] - t0, "t1": f["t1"] - t0})
        lost_other = sum(n for (blame, _, _), n in causes.items() if blame == "other")
        unrecorded = sum(t["failed"] for t in r["tallies"].values()) - len(r["failures"])
        lost_other += unrecorded  # past MAX_RECORDS nothing is known about them: blame nobody else
        base, end = self._windows()
        growth = {}
        for i, name in ((1, "rss"), (2, "fds")):
            b = statistics.median([s[i] for s in self.samples if base[0] <= s[0] < base[1]] or [0])
            e = statistics.median([s[i] for s in self.samples if end[0] <= s[0] <= end[1]] or [0])
            growth[name] = (b, e, (e - b) / b if b else float("nan"))
        loaded = [s for s in self.samples if s[0] <= self.duration_s]
        r["rest"] = {"before": list(loaded[0]), "after": list(self.samples[-1])}
        errors: collections.Counter[str] = collections.Counter()
        for line in log.splitlines():
            for level in ("ERROR", "WARNING"):
                if line.startswith(level + ":"):  # uvicorn's own
                    errors[f"{level} {line[len(level) + 1 :].strip()}"[:110]] += 1
                elif f" {level} " in line:  # ours: "<date> <time> LEVEL logger: message"
                    errors[re.sub(r"\d+", "N", f"{level} {line.split(f' {level} ', 1)[1]}")[:110]] += 1
        r.update(
            causes=[[*k, n] for k, n in causes.most_common()],
            lost_other=lost_other,
            growth=growth,
            windows=[base, end],
            kills=[vars(k) for k in self.kills],
            samples=self.samples,
            gateway_log=errors.most_common(8),
            stall_cuts=log.count("(limits.write_timeout_s)"),
            other_samples=samples,
        )
        before, after = r["rest"]["before"], r["rest"]["after"]
        # Nothing held once idle connections have timed out: no connection, and no more fds.
        r["rest_ok"] = after[3] == 0 and after[4] == 0 and after[2] <= before[2]
        r["ok"] = lost_other == 0 and all(g[2] < MAX_GROWTH for g in growth.values()) and r["rest_ok"]
        return r

    def _windows(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """Minute 2 and the last minute; for runs under 5 minutes, the second and last fifths."""
        d = self.duration_s
        if d >= 300:
            return (60.0, 120.0), (d - 60.0, d)
        return (d * 0.2, d * 0.4), (d * 0.8, d)


def render(r: dict[str, Any], duration_s: float, command: str) -> str:
    """The Markdown section of a soak run."""
    out = [
        f"### Soak: {duration_s:g} s of mixed load, a node killed and restarted every minute\n",
        f"Command: `{command}`; run {time.strftime('%Y-%m-%d %H:%M')}, {_tree()}. Gateway: "
        f"`rolemesh-gateway` (`python -m rolemesh_gateway.gateway.cli`), {NODES} fake nodes "
        "(`python -m bench.soak node`) of one `discovered` role, `round_robin`, `max_attempts: 3`, "
        f"`limits.write_timeout_s: {WRITE_TIMEOUT_S:g}`. Node kills: SIGKILL at {KILL_FIRST_S:g} s and "
        f"every {KILL_EVERY_S:g} s after, restarted on the same port {DOWN_S:g} s later. "
        f"Load for {r['seconds']:.0f} s.\n",
        "| traffic | sent | as expected | failed: node killed (injected) | failed: other |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    expected = {
        "plain chat": "expected: 200 with the node's answer",
        "SSE stream": "expected: 200, all 20 events and [DONE]",
        "vanishing client": "expected: 200 and two events; then it resets or closes, in turn",
        "stalled reader": f"expected: cut by the gateway during a {WRITE_TIMEOUT_S + 4:g} s stall",
        "bad input": "expected: 400, 401 or 404 as documented, OpenAI-shaped",
    }
    injected = collections.Counter[str]()
    other = collections.Counter[str]()
    for blame, kind, _what, n in r["causes"]:
        (injected if blame != "other" else other)[kind] += n
    for kind, why in expected.items():
        t = r["tallies"].get(kind, {"sent": 0, "ok": 0, "failed": 0})
        out.append(f"| {kind} ({why}) | {t['sent']:,} | {t['ok']:,} | {injected[kind]:,} | {other[kind]:,} |")
    total = sum(t["sent"] for t in r["tallies"].values())
    out.append(
        f"| **all** | **{total:,}** | **{sum(t['ok'] for t in r['tallies'].values()):,}** "
        f"| **{sum(injected.values()):,}** | **{sum(other.values()):,}** |"
    )
    out.append("")
    if r["plain_p50_ms"] is not None:
        out.append(
            f"Plain chat latency: p50 {r['plain_p50_ms']:.1f} ms, p99 {r['plain_p99_ms']:.1f} ms. "
            f"The gateway logged {r['stall_cuts']} streams ended for a client that read nothing for "
            f"{WRITE_TIMEOUT_S:g} s (`limits.write_timeout_s`). Gateway CPU: {r['gateway_cpu_s']:.0f} s "
            f"in {r['seconds']:.0f} s ({100 * r['gateway_cpu_s'] / r['seconds']:.0f}% of one core).\n"
        )
    out += [
        "Errors by cause:\n",
        "| blamed on | traffic | what the client saw | count |",
        "| --- | --- | --- | ---: |",
    ]
    out += [f"| {blame} | {kind} | {what} | {n:,} |" for blame, kind, what, n in r["causes"]] or [
        "| - | - | none | 0 |"
    ]
    out.append("")
    kills = ", ".join(
        f"{k['node']} at {k['at']:.0f} s (back at {k['up']:.0f} s)" for k in r["kills"] if k["up"] is not None
    )
    out.append(f"Node kills: {kills or 'none'}.\n")
    out += [
        "Gateway process, sampled from `/proc` every second; per minute of load, the median (and the "
        "range) of its open fds, and of the TCP connections among them from clients and to nodes:\n",
        "| minute | RSS (MiB) | open fds | client connections | node connections |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]

    def cell(values: list[float], fmt: str) -> str:
        return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"

    minutes = int(duration_s // 60) or 1
    span = duration_s / minutes
    for m in range(minutes):
        rows = [x for x in r["samples"] if m * span <= x[0] < (m + 1) * span]
        if rows:
            out.append(
                f"| {m + 1} | {cell([x[1] for x in rows], '.1f')} | {cell([x[2] for x in rows], '.0f')} "
                f"| {cell([x[3] for x in rows], '.0f')} | {cell([x[4] for x in rows], '.0f')} |"
            )
    before, after = r["rest"]["before"], r["rest"]["after"]
    out.append("")
    out.append(
        f"At rest: before the load {before[2]} fds ({before[3]} client, {before[4]} node connections), "
        f"RSS {before[1]:.1f} MiB; {SETTLE_S:g} s after it, once idle connections had timed out, "
        f"{after[2]} fds ({after[3]} client, {after[4]} node connections), RSS {after[1]:.1f} MiB.\n"
    )
    if r["other_samples"]:
        out.append("First failures not explained by a kill (t in s from the start):\n")
        for f in r["other_samples"]:
            when = f"{f['t0']:.1f}-{f['t1']:.1f}"
            out.append(f"- {f['kind']} at {when}, node {f['node']}: {f['what']} {f['detail']}".rstrip())
        out.append("")
    if r["gateway_log"]:
        out.append("Gateway log, WARNING and ERROR lines by kind (numbers as N), most frequent first:\n")
        out += [f"- {n:,} x `{m}`" for m, n in r["gateway_log"]]
        out.append("")
    (b0, b1), (e0, e1) = r["windows"]
    rss, fds = r["growth"]["rss"], r["growth"]["fds"]

    def holds(ok: bool) -> str:
        return "yes" if ok else "NO"

    out += [
        "| criterion | measured | holds |",
        "| --- | --- | --- |",
        f"| zero requests lost that the injected failures do not explain | {r['lost_other']} "
        f"| {holds(r['lost_other'] == 0)} |",
        f"| RSS flat: growth under 10%, median of {b0:.0f}-{b1:.0f} s vs median of {e0:.0f}-{e1:.0f} s "
        f"| {rss[0]:.1f} -> {rss[1]:.1f} MiB ({rss[2] * 100:+.1f}%) | {holds(rss[2] < MAX_GROWTH)} |",
        f"| open fds flat: growth under 10%, same windows "
        f"| {fds[0]:.0f} -> {fds[1]:.0f} ({fds[2] * 100:+.1f}%) | {holds(fds[2] < MAX_GROWTH)} |",
        f"| (extra) at rest {SETTLE_S:g} s after the load, no connection left and no more fds than before it "
        f"| {after[3]} client and {after[4]} node connections, {before[2]} -> {after[2]} fds "
        f"| {holds(r['rest_ok'])} |",
        "",
    ]
    return "\n".join(out)


def _tree() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "rolemesh_gateway"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "tree unknown"
    return f"HEAD {head}" + (" with uncommitted changes under rolemesh_gateway/" if dirty else "")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.soak")
    sub = p.add_subparsers(dest="cmd", required=True)
    n = sub.add_parser("node", help="a fake node: serve chat and SSE, register and heartbeat")
    n.add_argument("--gateway", required=True)
    n.add_argument("--node-id", required=True)
    n.add_argument("--port", type=int, required=True)
    n.add_argument("--heartbeat", type=float, default=1.0)
    ld = sub.add_parser("load", help="the mixed clients; prints one JSON line at the end")
    ld.add_argument("--gateway", required=True)
    ld.add_argument("--duration", type=float, required=True)
    ld.add_argument("--out", required=True, help="write the JSON result here")
    ld.add_argument("--plain", type=int, default=4)
    ld.add_argument("--streams", type=int, default=6)
    ld.add_argument("--vanish", type=int, default=2)
    ld.add_argument("--stall", type=int, default=1)
    ld.add_argument("--bad", type=int, default=1)
    args = p.parse_args()
    import uvloop

    uvloop.run(node_main(args) if args.cmd == "node" else load_main(args))


if __name__ == "__main__":
    main()
