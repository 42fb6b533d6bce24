"""Asking a server about itself: one health probe rule, and what it says about its model.

Shared by the gateway (proxy upstreams) and the agent (its backends).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import orjson

from .errors import RoleMeshError
from .http1 import Client


class ProbeResult(NamedTuple):
    up: bool
    #: "ok", or why not in words for the operator.
    reason: str
    #: The HTTP status, None when there was no answer at all.
    status: int | None


async def probe(
    client: Client,
    url: str,
    timeout_s: float,
    *,
    strict: bool = False,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> ProbeResult:
    """GET ``url``: is the server up, and if not, why.

    By default any answer below 500 means the server is up (a 404 only means it has no health
    path), and 5xx means it cannot serve yet (llama-server answers 503 while it loads a model).
    ``strict`` asks for exactly 200, for a server we know has the path (a llama-server we started).
    """
    try:
        status, _ = await client.request("GET", url, headers, b"", timeout_s, url)
    except RoleMeshError as exc:
        return ProbeResult(False, exc.message, None)
    if status == 200 or (not strict and status < 500):
        return ProbeResult(True, "ok", status)
    return ProbeResult(False, f"{url} answered HTTP {status}", status)


#: Model metadata larger than this is not kept (it is shown in every /v1/models answer).
MAX_MODEL_INFO_BYTES = 16 * 1024
_NOT_INFO = frozenset({"id", "object", "created", "owned_by"})


async def fetch_model_info(
    client: Client,
    base_url: str,
    timeout_s: float,
    headers: Sequence[tuple[bytes, bytes]],
    name: str | None = None,
) -> dict[str, Any] | None:
    """What ``GET {base_url}/v1/models`` says about its model (the entry named ``name``, or the
    only one), without the fields the gateway sets itself; None when it says nothing usable."""
    try:
        status, raw = await client.request("GET", f"{base_url}/v1/models", headers, b"", timeout_s, base_url)
        data = orjson.loads(raw) if status == 200 else None
    except (RoleMeshError, orjson.JSONDecodeError):
        return None
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        return None
    chosen = next((e for e in entries if isinstance(e, dict) and e.get("id") == name), None)
    if chosen is None:
        chosen = entries[0] if len(entries) == 1 and isinstance(entries[0], dict) else None
    if chosen is None:
        return None
    info = {k: v for k, v in chosen.items() if k not in _NOT_INFO}
    if not info or len(orjson.dumps(info)) > MAX_MODEL_INFO_BYTES:
        return None
    return info
