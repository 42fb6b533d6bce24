"""The one exception tree of both programs, and its one mapping to OpenAI-shaped error bodies.

::

    RoleMeshError                 status/type/code -> {"error": {...}}   (alias: GatewayError)
     ├─ BadRequest (400) ── InvalidJSON, InvalidNodeMessage
     ├─ Unauthorized (401)
     ├─ Forbidden (403) ── NodeOwnedElsewhere
     ├─ NotFound (404) ── ModelNotFound, NodeNotFound
     ├─ MethodNotAllowed (405)
     ├─ PayloadTooLarge (413)
     ├─ RegistryFull (507)
     ├─ RegistryUnavailable (503)
     ├─ NoUpstreamAvailable (503) ── QueueFull (429), QueueTimeout (503)
     ├─ RateLimited (429) ── TokensRateLimited   a client key over its own limit
     └─ UpstreamError ─┬─ UpstreamFailed (502) ── UpstreamUnreachable
                       ├─ UpstreamTimeout (504)
                       ├─ LoopDetected (502)  the request came back to this gateway
                       └─ Refused         the other side answered "no" (the agent's registration)
    StreamBroken      not an answer: the upstream failed after the head; the client was told in-band
    ClientStalled     not an answer: the client stopped reading a stream; it was ended
    ConfigError       start-up only: a config problem phrased as one line

Translation happens only at the edges: socket, TLS and parser errors in
:mod:`~rolemesh_gateway.common.http1`; JSON and body limits in
:mod:`~rolemesh_gateway.common.asgi`; pydantic wire errors in :func:`wire_error`. Messages name
the ``target`` they were given ("upstream planner (http://...)", "gateway http://..."), so no
caller edits them.
"""

from __future__ import annotations

from typing import ClassVar

import orjson
from pydantic import ValidationError


class RoleMeshError(Exception):
    """Base class: an error with an HTTP status and an OpenAI error ``type``/``code``."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None
    #: Seconds a client should wait before trying again (sent as ``Retry-After``), if it should.
    retry_after: int | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def payload(self) -> dict[str, object]:
        """The OpenAI error object for this error."""
        return error_payload(self.message, self.type, self.code, self.param)

    def body(self) -> bytes:
        return orjson.dumps(self.payload())

    def anthropic_body(self) -> bytes:
        """The same error in the Anthropic API's shape (for ``/v1/messages`` clients)."""
        kind = _ANTHROPIC_TYPES.get(self.status, "api_error")
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": self.message}})


#: The name the public API has always used.
GatewayError = RoleMeshError


class BadRequest(RoleMeshError):
    status = 400
    type = "invalid_request_error"
    code = "bad_request"


class InvalidJSON(BadRequest):
    code = "invalid_json"


class InvalidNodeMessage(BadRequest):
    """A registration or heartbeat body that does not match the node protocol."""

    code = "invalid_node_message"


class Unauthorized(RoleMeshError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(RoleMeshError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NodeOwnedElsewhere(Forbidden):
    """The node_id belongs to the node key that registered it first; another key may not touch it."""

    code = "node_owned_by_another_key"


class NotFound(RoleMeshError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class NodeNotFound(NotFound):
    code = "node_not_found"


class MethodNotAllowed(RoleMeshError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(RoleMeshError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RegistryFull(RoleMeshError):
    """The node registry holds ``nodes.max_nodes`` nodes already."""

    status = 507
    type = "server_error"
    code = "registry_full"


class RegistryUnavailable(RoleMeshError):
    """The shared node registry (Redis) cannot be reached: node writes wait for it."""

    status = 503
    type = "service_unavailable"
    code = "registry_unavailable"
    retry_after = 2


class NoUpstreamAvailable(RoleMeshError):
    """No backend can take the request now (all down, stale, or ejected)."""

    status = 503
    type = "service_unavailable"
    code = "no_upstream_available"
    retry_after = 5  # about half a default ejection; nodes come back on their own


class QueueFull(NoUpstreamAvailable):
    """Every node of the role is at capacity and the wait queue is full."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"
    retry_after = 1


class QueueTimeout(NoUpstreamAvailable):
    """The request waited in the queue for a free slot longer than allowed."""

    status = 503
    code = "queue_timeout"
    retry_after = 1


class RateLimited(RoleMeshError):
    """A client key is over its own ``rate_limit`` or ``max_concurrent`` (OpenAI's 429 shape:
    ``type`` says which budget, ``requests`` or ``tokens``; ``code`` is ``rate_limit_exceeded``)."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, retry_after)


class TokensRateLimited(RateLimited):
    type = "tokens"


class UpstreamError(RoleMeshError):
    """Talking to another HTTP server (an upstream, a node, the gateway) went wrong."""

    status = 502
    type = "upstream_error"
    code = "upstream_failed"


class UpstreamFailed(UpstreamError):
    """The server could not be reached or broke the exchange."""


class UpstreamUnreachable(UpstreamFailed):
    """Could not connect at all: nothing was sent, so trying another node is always safe."""


class LoopDetected(UpstreamError):
    """The request has passed through this gateway already (a node registered at its own URL)."""

    code = "loop_detected"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class Refused(UpstreamError):
    """The other server answered, but refused what was asked (a registration, a heartbeat)."""


class StreamBroken(Exception):
    """The upstream failed after the response had started; the client was told in-band."""

    def __init__(self, error: RoleMeshError) -> None:
        super().__init__(error.message)
        self.error = error


class ClientStalled(Exception):
    """The client read nothing of a stream for ``limits.write_timeout_s``: the stream was ended.

    Nobody's fault upstream: the node is not held to it, and the client gets no more bytes.
    """


class ConfigError(Exception):
    """A config problem, already phrased as one line for the operator."""


#: HTTP status -> the Anthropic API's error type.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def error_payload(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, object]:
    """Build ``{"error": {...}}`` in the shape every OpenAI client parses."""
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


def wire_error(exc: ValidationError, what: str) -> InvalidNodeMessage:
    """A pydantic error on a node-protocol body as one 400 (``what``: registration, heartbeat)."""
    err = exc.errors(include_url=False)[0]
    loc = err["loc"]
    where = ".".join(str(p) for p in loc) or "body"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return InvalidNodeMessage(f"invalid node {what}: {where}: {msg}", param=str(loc[0]) if loc else None)
