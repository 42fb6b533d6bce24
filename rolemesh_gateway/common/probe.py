"""One health probe, shared by the gateway (proxy upstreams) and the agent (its backends)."""

from __future__ import annotations

from typing import NamedTuple

from .errors import RoleMeshError
from .http1 import Client


class ProbeResult(NamedTuple):
    up: bool
    #: "ok", or why not in words for the operator.
    reason: str
    #: The HTTP status, None when there was no answer at all.
    status: int | None


async def probe(client: Client, url: str, timeout_s: float, *, strict: bool = False) -> ProbeResult:
    """GET ``url``: is the server up, and if not, why.

    By default any answer below 500 means the server is up (a 404 only means it has no health
    path), and 5xx means it cannot serve yet (llama-server answers 503 while it loads a model).
    ``strict`` asks for exactly 200, for a server we know has the path (a llama-server we started).
    """
    try:
        status, _ = await client.request("GET", url, (), b"", timeout_s, url)
    except RoleMeshError as exc:
        return ProbeResult(False, exc.message, None)
    if status == 200 or (not strict and status < 500):
        return ProbeResult(True, "ok", status)
    return ProbeResult(False, f"{url} answered HTTP {status}", status)
