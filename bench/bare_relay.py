"""The reference floor: the least a Python relay can do on this stack.

A raw ASGI app (no framework) served by uvicorn with uvloop + httptools, relaying every
request to ``BENCH_UPSTREAM`` through one pooled aiohttp ClientSession. No auth, no routing,
no header hygiene, no error handling: whatever RoleMesh costs beyond this is the price of its
features. Run: ``uvicorn --app-dir bench bare_relay:app --loop uvloop --http httptools``.
"""

from __future__ import annotations

import os
from typing import Any

import aiohttp

UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:9001")
_session: aiohttp.ClientSession | None = None


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _session
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                _session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if _session is not None:
                    await _session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    assert _session is not None
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    async with _session.request(
        scope["method"],
        UPSTREAM + scope["path"],
        data=body,
        headers={"content-type": "application/json"},
    ) as resp:
        ctype = resp.headers.get("content-type", "application/json").encode()
        if resp.content_length is not None:
            data = await resp.read()
            await send(
                {
                    "type": "http.response.start",
                    "status": resp.status,
                    "headers": [(b"content-type", ctype), (b"content-length", str(len(data)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": data})
            return
        await send(
            {"type": "http.response.start", "status": resp.status, "headers": [(b"content-type", ctype)]}
        )
        async for chunk in resp.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
