"""CORS for browser clients: ``cors.allow_origins`` (none by default, so nothing changes).

A preflight (``OPTIONS`` with an allowed ``Origin``) is answered here, without a key; every
other answer to an allowed origin, errors included, carries ``Access-Control-Allow-Origin``.
The upstreams' own CORS headers are never relayed (common/relay.py drops them), so this
setting alone decides which pages may read the gateway's answers.
"""

from __future__ import annotations

from ..common.asgi import Headers, Message, Scope, Send
from .settings import CorsSettings

_METHODS = b"GET, POST, DELETE, OPTIONS"
#: Readable by a page: the request id (to report problems) and when to retry.
_EXPOSE = b"x-request-id, retry-after"


class Cors:
    def __init__(self, settings: CorsSettings) -> None:
        self._any = "*" in settings.allow_origins
        self._origins = frozenset(o.encode("latin-1") for o in settings.allow_origins)

    def allowed(self, origin: bytes) -> bool:
        return self._any or origin in self._origins

    async def preflight(self, scope: Scope, send: Send, origin: bytes) -> None:
        asked = b""
        for k, v in scope["headers"]:
            if k == b"access-control-request-headers":
                asked = v
        headers: Headers = [
            (b"access-control-allow-origin", origin),
            (b"access-control-allow-methods", _METHODS),
            (b"access-control-max-age", b"600"),
            (b"vary", b"origin"),
            (b"content-length", b"0"),
        ]
        if asked:  # echoed: a wildcard would not cover Authorization
            headers.append((b"access-control-allow-headers", asked))
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    def wrap(send: Send, origin: bytes) -> Send:
        """``send`` with the CORS headers added to the answer's head."""

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message["headers"],
                    (b"access-control-allow-origin", origin),
                    (b"access-control-expose-headers", _EXPOSE),
                    (b"vary", b"origin"),
                ]
            await send(message)

        return send_with_cors
