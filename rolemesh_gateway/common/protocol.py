"""Wire models of the node protocol, shared by the gateway and the node agent.

A node registers ``{"node_id", "base_url", "roles"}`` (plus optional capacity fields), then
heartbeats ``{"node_id", ...load}``. Both programs import these models so that what one
sends is exactly what the other validates.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from .config import check_http_url

#: Header that carries a node key (gateway <-> node, both directions).
NODE_KEY_HEADER = "X-RoleMesh-Node-Key"
#: The same, as it appears in ASGI scopes and on the wire (lower case, bytes).
NODE_KEY = NODE_KEY_HEADER.lower().encode("ascii")

_NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
_ROLE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
MAX_ROLES = 32
MAX_MODEL_INFO_BYTES = 16 * 1024


def check_node_id(value: str) -> str:
    if not _NODE_ID_RE.match(value):
        raise ValueError(
            "must be 1-128 printable characters (letters, digits, '.', '_', ':', '@', '-'), "
            "starting with a letter or digit"
        )
    return value


def check_role(value: str) -> str:
    if not _ROLE_RE.match(value):
        raise ValueError("must be 1-64 characters of letters, digits, '.', '_', ':', '-' (a role name)")
    return value


NodeId = Annotated[str, AfterValidator(check_node_id)]
Role = Annotated[str, AfterValidator(check_role)]


class _Wire(BaseModel):
    # Extra fields are ignored so that newer agents can talk to older gateways.
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class Load(_Wire):
    """Load figures a node reports; all optional."""

    inflight: Annotated[int, Field(ge=0)] | None = None
    slots_total: Annotated[int, Field(ge=0)] | None = None
    slots_busy: Annotated[int, Field(ge=0)] | None = None
    #: Roles this node serves on demand and whose server is not running now: it can serve them
    #: after a load. Absent (older agents): every role is warm.
    cold_roles: Annotated[list[Role], Field(max_length=MAX_ROLES)] | None = None


def check_model_info(value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    if len(orjson.dumps(value)) > MAX_MODEL_INFO_BYTES:
        raise ValueError(f"must be at most {MAX_MODEL_INFO_BYTES} bytes of JSON")
    return value


class RegisterRequest(Load):
    node_id: NodeId
    base_url: Annotated[str, Field(max_length=2048), AfterValidator(check_http_url)]
    roles: Annotated[list[Role], Field(min_length=1, max_length=MAX_ROLES)]
    version: Annotated[str, Field(max_length=64)] | None = None
    #: Per role, what its server says about its model in ``/v1/models`` (llama-server's
    #: ``meta``: training context, parameter count...), shown by the gateway's ``/v1/models``.
    models: Annotated[dict[Role, dict[str, Any]], AfterValidator(check_model_info)] | None = None


class HeartbeatRequest(Load):
    node_id: NodeId


class RegisterResponse(_Wire):
    node_id: str
    stale_after_s: float
    heartbeat_interval_hint_s: float
