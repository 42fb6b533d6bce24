"""The llama-server endpoints a client uses, routed by ``model``: one table for both programs.

The gateway serves each of them under its own path and sends it upstream under
``upstream_path`` (the paths without ``/v1`` that OpenAI clients use with a bare base URL go
upstream in their ``/v1`` form, so they behave as their ``/v1`` forms everywhere). The node
agent accepts every ``upstream_path`` and relays it unchanged to the role's llama-server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Dialect = Literal["openai", "anthropic"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str
    path: str
    upstream_path: str
    #: The error shape of the answers the gateway makes itself on this path.
    dialect: Dialect = "openai"
    #: Where ``model`` is read: the JSON body, or the query string (``GET /props?model=``).
    model_in: Literal["body", "query"] = "body"


def _post(path: str, upstream: str | None = None, dialect: Dialect = "openai") -> Endpoint:
    return Endpoint("POST", path, upstream or path, dialect)


ROUTED: tuple[Endpoint, ...] = (
    # OpenAI
    _post("/v1/chat/completions"),
    _post("/v1/completions"),
    _post("/v1/embeddings"),
    _post("/v1/responses"),
    _post("/chat/completions", "/v1/chat/completions"),
    _post("/completions", "/v1/completions"),
    _post("/embeddings", "/v1/embeddings"),
    # Anthropic Messages (llama-server speaks it; so do Anthropic SDK clients and coding agents)
    _post("/v1/messages", dialect="anthropic"),
    _post("/v1/messages/count_tokens", dialect="anthropic"),
    # llama.cpp's own
    _post("/v1/rerank"),
    _post("/v1/reranking"),
    _post("/rerank"),
    _post("/reranking"),
    _post("/infill"),
    _post("/tokenize"),
    _post("/detokenize"),
    _post("/apply-template"),
    _post("/completion"),
    _post("/embedding"),
    Endpoint("GET", "/props", "/props", model_in="query"),
)

#: Paths whose gateway-made errors take the Anthropic shape.
ANTHROPIC_PATHS = frozenset(e.path for e in ROUTED if e.dialect == "anthropic")
#: What the agent relays to a role's server: method and path as the gateway sends them.
UPSTREAM = frozenset((e.method, e.upstream_path) for e in ROUTED)
