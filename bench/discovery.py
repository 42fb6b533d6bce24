"""Node fleet simulator: register N nodes of one role, then heartbeat each every ``--interval``.

Run as ``python -m bench.discovery --gateway URL --node-key K --nodes N --base-url URL``.
Prints ``{"registered": N, ...}`` once every node is registered, then heartbeats evenly spread
over the interval (N / interval requests per second) for ``--duration`` seconds and prints
the heartbeat counts. Nodes cycle through the ``--base-url`` values given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time

import aiohttp
import orjson

_CONCURRENCY = 16


async def _post(session: aiohttp.ClientSession, url: str, body: bytes, key: str) -> int:
    async with session.post(
        url, data=body, headers={"X-RoleMesh-Node-Key": key, "Content-Type": "application/json"}
    ) as resp:
        await resp.read()
        return resp.status


async def run(args: argparse.Namespace) -> None:
    ids = [f"{args.prefix}-{i:05d}" for i in range(args.nodes)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    connector = aiohttp.TCPConnector(limit=_CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        sem = asyncio.Semaphore(_CONCURRENCY)
        failed: list[int] = []

        async def register(i: int, node_id: str) -> None:
            body = orjson.dumps(
                {"node_id": node_id, "base_url": args.base_url[i % len(args.base_url)], "roles": [args.role]}
            )
            async with sem:
                status = await _post(session, args.gateway + "/v1/nodes/register", body, args.node_key)
            if status not in (200, 201):
                failed.append(status)

        t0 = time.monotonic()
        await asyncio.gather(*(register(i, n) for i, n in enumerate(ids)))
        reg_s = time.monotonic() - t0
        print(
            orjson.dumps(
                {"registered": len(ids) - len(failed), "failed": len(failed), "seconds": reg_s}
            ).decode(),
            flush=True,
        )
        if failed:
            return

        counts = {"ok": 0, "bad": 0, "error": 0, "late": 0}
        inflight: set[asyncio.Task[None]] = set()

        async def beat(node_id: str) -> None:
            try:
                async with sem:
                    status = await _post(
                        session,
                        args.gateway + "/v1/nodes/heartbeat",
                        orjson.dumps({"node_id": node_id, "inflight": 0}),
                        args.node_key,
                    )
                counts["ok" if status == 200 else "bad"] += 1
            except (aiohttp.ClientError, OSError, TimeoutError):
                counts["error"] += 1

        # Node k beats at start + k * interval / N, then every interval: an even rate.
        step = args.interval / len(ids)
        start = time.monotonic()
        end = start + args.duration
        k = 0
        while not stop.is_set() and time.monotonic() < end:
            due = int((time.monotonic() - start) / step) + 1
            if due - k > len(ids):  # fell a whole round behind: skip ahead and say so
                counts["late"] += due - k - len(ids)
                k = due - len(ids)
            while k < due:
                task = loop.create_task(beat(ids[k % len(ids)]))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
                k += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.01)
        for task in list(inflight):
            task.cancel()
        await asyncio.gather(*inflight, return_exceptions=True)
        elapsed = time.monotonic() - start
        print(
            orjson.dumps({**counts, "seconds": elapsed, "per_s": counts["ok"] / elapsed}).decode(), flush=True
        )


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
