"""The endpoint table: every llama-server endpoint a client uses is routed by ``model``, through
the gateway (under its own path) and the agent (under the path the gateway sends)."""

from __future__ import annotations

import orjson
import pytest

from rolemesh_gateway.common.endpoints import ANTHROPIC_PATHS, ROUTED, UPSTREAM, Endpoint
from tests.fakeclient import FakeClient, Reply, call_app, run
from tests.test_inference import AUTH, FAST, gateway


def test_the_table_covers_what_llama_server_serves() -> None:
    paths = {e.path for e in ROUTED}
    for path in (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/rerank",
        "/rerank",
        "/v1/reranking",
        "/infill",
        "/tokenize",
        "/detokenize",
        "/apply-template",
        "/completion",
        "/embedding",
        "/props",
        "/chat/completions",
        "/completions",
        "/embeddings",
    ):
        assert path in paths, path
    assert {"/v1/messages", "/v1/messages/count_tokens"} == ANTHROPIC_PATHS
    # The paths without /v1 go upstream as their /v1 forms, everything else unchanged.
    assert {e.path: e.upstream_path for e in ROUTED if e.path != e.upstream_path} == {
        "/chat/completions": "/v1/chat/completions",
        "/completions": "/v1/completions",
        "/embeddings": "/v1/embeddings",
    }
    assert {("POST", "/v1/chat/completions"), ("GET", "/props"), ("POST", "/tokenize")} <= UPSTREAM


@pytest.mark.parametrize("endpoint", [e for e in ROUTED if e.method == "POST"], ids=lambda e: e.path)
def test_every_post_endpoint_is_routed_by_model(endpoint: Endpoint) -> None:
    async def go() -> None:
        client = FakeClient().on(FAST, Reply.json(200, {"ok": endpoint.path}))
        sent = await call_app(gateway(client), "POST", endpoint.path, {"model": "fast-model"}, AUTH)
        assert sent.status == 200 and sent.json() == {"ok": endpoint.path}
        (call,) = client.calls
        assert call.url == FAST + endpoint.upstream_path

    run(go())


def test_props_is_routed_by_the_query_and_the_model_rewritten() -> None:
    async def go() -> None:
        client = FakeClient().on(FAST, Reply.json(200, {"n_ctx": 512}))
        client.on("http://big.test:8002", Reply.json(200, {"n_ctx": 4096}))
        app = gateway(client)
        sent = await call_app(app, "GET", "/props", headers=AUTH, query=b"model=big")
        assert sent.json() == {"n_ctx": 4096}
        assert client.calls[-1].url == "http://big.test:8002/props?model=llama-70b-q4"  # upstream_model
        sent = await call_app(app, "GET", "/props", headers=AUTH)  # no model: the default alias
        assert sent.json() == {"n_ctx": 512} and client.calls[-1].url == FAST + "/props"
        missing = await call_app(app, "GET", "/props", headers=AUTH, query=b"model=nope")
        assert missing.status == 404 and missing.json()["error"]["code"] == "model_not_found"

    run(go())


def test_gateway_errors_on_anthropic_paths_have_the_anthropic_shape() -> None:
    async def go() -> None:
        app = gateway(FakeClient())
        sent = await call_app(app, "POST", "/v1/messages", {"model": "claude-x", "max_tokens": 5}, AUTH)
        assert sent.status == 404
        body = orjson.loads(sent.body)
        assert body == {
            "type": "error",
            "error": {"type": "not_found_error", "message": body["error"]["message"]},
        }
        assert "claude-x" in body["error"]["message"]
        unauth = await call_app(app, "POST", "/v1/messages/count_tokens", {"model": "fast"}, [])
        assert unauth.status == 401 and orjson.loads(unauth.body)["error"]["type"] == "authentication_error"
        # Elsewhere: the OpenAI shape.
        other = await call_app(app, "POST", "/v1/chat/completions", {"model": "claude-x"}, AUTH)
        assert orjson.loads(other.body)["error"]["code"] == "model_not_found"

    run(go())


def test_anthropic_sdk_key_header_is_a_client_key() -> None:
    async def go() -> None:
        client = FakeClient().on(FAST, Reply.json(200, {"type": "message"}))
        headers = [(b"x-api-key", b"client-key-1"), (b"anthropic-version", b"2023-06-01")]
        sent = await call_app(gateway(client), "POST", "/v1/messages", {"model": "fast"}, headers)
        assert sent.status == 200
        (call,) = client.calls
        assert call.header(b"anthropic-version") == b"2023-06-01"  # passed on
        assert call.header(b"x-api-key") is None  # the client's key never is

    run(go())
