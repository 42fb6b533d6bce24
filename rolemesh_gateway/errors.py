"""The gateway's exception tree and its one mapping to OpenAI-shaped error responses.

Everything that can go wrong while serving a request is raised as a :class:`GatewayError`
subclass; third-party errors (sockets, JSON) are translated into these at one choke point
(:mod:`rolemesh_gateway.upstream` and the request readers), and :func:`error_payload` turns
any of them into the body OpenAI clients understand.
"""

from __future__ import annotations

from typing import ClassVar

import orjson


class GatewayError(Exception):
    """Base class: an error with an HTTP status and an OpenAI error ``type``/``code``."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def payload(self) -> dict[str, object]:
        """The OpenAI error object for this error."""
        return error_payload(self.message, self.type, self.code, self.param)

    def body(self) -> bytes:
        return orjson.dumps(self.payload())


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "bad_request"


class InvalidJSON(BadRequest):
    code = "invalid_json"


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class NoUpstreamAvailable(GatewayError):
    """No backend can take the request now (all down, stale, or ejected)."""

    status = 503
    type = "service_unavailable"
    code = "no_upstream_available"


class QueueFull(NoUpstreamAvailable):
    """Every node of the role is at capacity and the wait queue is full."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class QueueTimeout(NoUpstreamAvailable):
    """The request waited in the queue for a free slot longer than allowed."""

    status = 503
    code = "queue_timeout"


class UpstreamFailed(GatewayError):
    """The upstream could not be reached or broke the exchange."""

    status = 502
    type = "upstream_error"
    code = "upstream_failed"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


def error_payload(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, object]:
    """Build ``{"error": {...}}`` in the shape every OpenAI client parses."""
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}
