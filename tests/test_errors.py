"""The exception tree: statuses, OpenAI-shaped bodies, and node-protocol errors as one line."""

from __future__ import annotations

import orjson
import pytest
from pydantic import ValidationError

from rolemesh_gateway.common import errors as e
from rolemesh_gateway.common.protocol import HeartbeatRequest, RegisterRequest


@pytest.mark.parametrize(
    ("cls", "status", "type_", "code"),
    [
        (e.BadRequest, 400, "invalid_request_error", "bad_request"),
        (e.InvalidJSON, 400, "invalid_request_error", "invalid_json"),
        (e.InvalidNodeMessage, 400, "invalid_request_error", "invalid_node_message"),
        (e.Unauthorized, 401, "authentication_error", "invalid_api_key"),
        (e.NotFound, 404, "invalid_request_error", "not_found"),
        (e.ModelNotFound, 404, "invalid_request_error", "model_not_found"),
        (e.NodeNotFound, 404, "invalid_request_error", "node_not_found"),
        (e.MethodNotAllowed, 405, "invalid_request_error", "method_not_allowed"),
        (e.PayloadTooLarge, 413, "invalid_request_error", "request_too_large"),
        (e.RegistryFull, 507, "server_error", "registry_full"),
        (e.NoUpstreamAvailable, 503, "service_unavailable", "no_upstream_available"),
        (e.QueueFull, 429, "rate_limit_error", "queue_full"),
        (e.QueueTimeout, 503, "service_unavailable", "queue_timeout"),
        (e.UpstreamFailed, 502, "upstream_error", "upstream_failed"),
        (e.UpstreamUnreachable, 502, "upstream_error", "upstream_failed"),
        (e.UpstreamTimeout, 504, "upstream_error", "upstream_timeout"),
    ],
)
def test_each_error_has_its_status_and_openai_type(
    cls: type[e.RoleMeshError], status: int, type_: str, code: str
) -> None:
    err = cls("what went wrong")
    assert (err.status, err.type, err.code) == (status, type_, code)
    assert orjson.loads(err.body()) == {
        "error": {"message": "what went wrong", "type": type_, "code": code, "param": None}
    }


def test_the_tree() -> None:
    assert e.GatewayError is e.RoleMeshError
    assert issubclass(e.InvalidJSON, e.BadRequest) and issubclass(e.InvalidNodeMessage, e.BadRequest)
    assert issubclass(e.ModelNotFound, e.NotFound) and issubclass(e.NodeNotFound, e.NotFound)
    # Queue errors are "no upstream available" for anyone who catches that.
    assert issubclass(e.QueueFull, e.NoUpstreamAvailable) and issubclass(
        e.QueueTimeout, e.NoUpstreamAvailable
    )
    # Could not connect is a failure; a timeout and a refusal are upstream errors but not failures.
    assert issubclass(e.UpstreamUnreachable, e.UpstreamFailed)
    assert not issubclass(e.UpstreamTimeout, e.UpstreamFailed)
    assert issubclass(e.Refused, e.UpstreamError) and not issubclass(e.Refused, e.UpstreamFailed)
    # Not answers: never turned into an HTTP error body by mistake.
    assert not issubclass(e.StreamBroken, e.RoleMeshError) and not issubclass(e.ConfigError, e.RoleMeshError)


def test_payload_carries_param_and_message_is_kept() -> None:
    err = e.ModelNotFound("model 'x' does not exist", param="model")
    assert str(err) == err.message == "model 'x' does not exist"
    assert err.payload() == {
        "error": {
            "message": "model 'x' does not exist",
            "type": "invalid_request_error",
            "code": "model_not_found",
            "param": "model",
        }
    }


def test_error_payload_shape() -> None:
    assert e.error_payload("m", "t") == {"error": {"message": "m", "type": "t", "code": None, "param": None}}


def test_stream_broken_carries_the_error_that_broke_it() -> None:
    cause = e.UpstreamTimeout("node a did not send more of its answer in time")
    broken = e.StreamBroken(cause)
    assert broken.error is cause and str(broken) == cause.message


def wire(model: type[RegisterRequest] | type[HeartbeatRequest], data: object) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return info.value


def test_wire_error_names_registration_and_the_field() -> None:
    exc = wire(RegisterRequest, {"node_id": "a", "base_url": "ftp://x", "roles": ["chat"]})
    err = e.wire_error(exc, "registration")
    assert isinstance(err, e.InvalidNodeMessage) and err.status == 400
    assert err.message.startswith("invalid node registration: base_url: ")
    assert "http:// or https://" in err.message and "Value error" not in err.message
    assert err.param == "base_url"


def test_wire_error_names_heartbeat_and_a_missing_field() -> None:
    err = e.wire_error(wire(HeartbeatRequest, {"inflight": 1}), "heartbeat")
    assert err.message == "invalid node heartbeat: node_id: Field required"
    assert err.param == "node_id"


def test_wire_error_names_the_item_of_a_list() -> None:
    exc = wire(RegisterRequest, {"node_id": "a", "base_url": "http://x:1", "roles": ["ok", "not ok"]})
    err = e.wire_error(exc, "registration")
    assert err.message.startswith("invalid node registration: roles.1: must be 1-64 characters")
    assert err.param == "roles"


def test_wire_error_of_a_non_object_says_body() -> None:
    err = e.wire_error(wire(HeartbeatRequest, ["not", "an", "object"]), "heartbeat")
    assert err.message.startswith("invalid node heartbeat: body: ")
    assert err.param is None
