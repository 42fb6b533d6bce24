"""Node fleet simulator: register N nodes of one role, then heartbeat each every ``--interval``.

Run as ``python -m bench.discovery --gateway URL --node-key K --nodes N --base-url URL``.
Prints ``{"registered": N, ...}`` once every node is registered, then heartbeats evenly spread
over the interval (N / interval requests per second) for ``--duration`` seconds (or until
SIGTERM) and prints the heartbeat counts. Nodes cycle through the ``--base-url`` values given.

It shares the machine with the gateway it loads, so it is kept cheap: a few keep-alive
connections, requests pre-encoded as bytes, and a minimal HTTP/1.1 response reader (the
gateway always answers with a Content-Length).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time
from urllib.parse import urlsplit

import orjson

_CONNECTIONS = 8


def _request(host: str, path: str, key: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nX-RoleMesh-Node-Key: {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class _Conn:
    """One keep-alive connection that sends a request and reads its answer, one at a time.

    The gateway closes a connection that stays idle past its keep-alive timeout (uvicorn: 5 s),
    which a small fleet's heartbeats do: a request that finds its connection closed reconnects
    and is sent once more.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def call(self, request: bytes) -> int:
        async with asyncio.timeout(10):  # a gateway that stops answering must not hang the run
            if self.writer is not None and not self.writer.is_closing():
                try:
                    return await self._call(request)
                except (OSError, asyncio.IncompleteReadError):
                    self.close()
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            return await self._call(request)

    async def _call(self, request: bytes) -> int:
        assert self.reader is not None and self.writer is not None
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length:
            await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def run(args: argparse.Namespace) -> None:
    parts = urlsplit(args.gateway)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    hosthdr = f"{host}:{port}"
    ids = [f"{args.prefix}-{i:05d}" for i in range(args.nodes)]
    registers = [
        _request(
            hosthdr,
            "/v1/nodes/register",
            args.node_key,
            orjson.dumps(
                {"node_id": nid, "base_url": args.base_url[i % len(args.base_url)], "roles": [args.role]}
            ),
        )
        for i, nid in enumerate(ids)
    ]
    beats = [
        _request(hosthdr, "/v1/nodes/heartbeat", args.node_key, orjson.dumps({"node_id": nid, "inflight": 0}))
        for nid in ids
    ]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    conns = [_Conn(host, port) for _ in range(min(_CONNECTIONS, len(ids)))]

    # -- registration: every connection works through its share of the nodes -----------------------
    failed: list[int] = []

    async def register_share(conn: _Conn, share: list[bytes]) -> None:
        for req in share:
            status = await conn.call(req)
            if status not in (200, 201):
                failed.append(status)

    t0 = time.monotonic()
    await asyncio.gather(*(register_share(c, registers[i :: len(conns)]) for i, c in enumerate(conns)))
    reg_s = time.monotonic() - t0
    print(
        orjson.dumps({"registered": len(ids) - len(failed), "failed": len(failed), "seconds": reg_s}).decode()
    )
    print(flush=True, end="")
    if failed:
        return

    # -- heartbeats: node k is due at start + k * interval / N, then every interval -----------------
    counts = {"ok": 0, "bad": 0, "error": 0, "late": 0}
    queue: asyncio.Queue[int] = asyncio.Queue()

    async def worker(conn: _Conn) -> None:
        while True:
            k = await queue.get()
            try:
                counts["ok" if await conn.call(beats[k % len(beats)]) == 200 else "bad"] += 1
            except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError):
                counts["error"] += 1  # and carry on: the next call reconnects

    workers = [loop.create_task(worker(c), name=f"heartbeat-conn-{i}") for i, c in enumerate(conns)]
    step = args.interval / len(ids)
    cpu0 = time.process_time()
    start = time.monotonic()
    end = start + args.duration
    k = 0
    while not stop.is_set() and time.monotonic() < end:
        due = int((time.monotonic() - start) / step) + 1
        if queue.qsize() > len(ids):  # a whole round behind: drop the backlog and say so
            while not queue.empty():
                queue.get_nowait()
                counts["late"] += 1
        while k < due:
            queue.put_nowait(k)
            k += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.01)
    for w in workers:
        w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    for c in conns:
        c.close()
    elapsed = time.monotonic() - start
    cpu_us = (time.process_time() - cpu0) * 1e6 / max(1, counts["ok"])
    result = {**counts, "seconds": elapsed, "per_s": counts["ok"] / elapsed, "sim_cpu_us_per_beat": cpu_us}
    print(orjson.dumps(result).decode(), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.discovery")
    p.add_argument("--gateway", required=True)
    p.add_argument("--node-key", required=True)
    p.add_argument("--nodes", type=int, default=10_000)
    p.add_argument("--role", default="writer")
    p.add_argument("--base-url", action="append", required=True)
    p.add_argument("--interval", type=float, default=10.0)
    p.add_argument("--duration", type=float, default=60.0, help="heartbeat for this long, then exit")
    p.add_argument("--prefix", default="bench-node")
    args = p.parse_args()
    import uvloop

    uvloop.run(run(args))


if __name__ == "__main__":
    main()
