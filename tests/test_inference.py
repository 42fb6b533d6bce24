"""The inference endpoints, called as an ASGI app with a scripted upstream: no network at all."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from rolemesh_gateway.common.errors import UpstreamUnreachable
from rolemesh_gateway.common.protocol import NODE_KEY
from rolemesh_gateway.gateway.app import Gateway, create_app
from rolemesh_gateway.gateway.inference import MAX_REQUEST_ID
from rolemesh_gateway.gateway.settings import parse_settings
from tests.fakeclient import Call, FakeClient, Raise, Reply, Sent, call_app, run

CLIENT_KEY = "client-key-1"
NODE_KEY_VALUE = "node-key-1"
FAST = "http://fast.test:8001"
BIG = "http://big.test:8002"
AUTH = [(b"authorization", b"Bearer " + CLIENT_KEY.encode())]


def gateway(client: FakeClient, **extra: Any) -> Gateway:
    settings = parse_settings(
        {
            "version": 1,
            "default_model": "fast",
            "auth": {"client_api_keys": [CLIENT_KEY], "node_api_keys": [NODE_KEY_VALUE]},
            "models": {
                "fast": {"type": "proxy", "proxy_url": FAST, "openai_model_name": "fast-model"},
                "big": {"type": "proxy", "proxy_url": BIG, "upstream_model": "llama-70b-q4"},
            },
            **extra,
        },
        env={},
    )
    return create_app(settings, client=client)  # type: ignore[arg-type]


def answering() -> FakeClient:
    return FakeClient().on(FAST, Reply.json(200, {"from": "fast"})).on(BIG, Reply.json(200, {"from": "big"}))


async def chat(
    app: Gateway,
    body: Any,
    headers: list[tuple[bytes, bytes]] | None = None,
    path: str = "/v1/chat/completions",
) -> Sent:
    return await call_app(app, "POST", path, body, AUTH + (headers or []))


def only_call(client: FakeClient) -> Call:
    (call,) = client.calls
    return call


def test_no_model_goes_to_the_default_alias_unchanged() -> None:
    async def go() -> None:
        client = answering()
        raw = b'{"messages": [{"role": "user", "content": "hi"}], "stream": false}'
        sent = await chat(gateway(client), raw)
        assert sent.status == 200 and sent.json() == {"from": "fast"}
        call = only_call(client)
        assert call.url == FAST + "/v1/chat/completions"
        assert call.body == raw  # not re-encoded: the upstream gets the client's bytes

    run(go())


def test_alias_and_openai_model_name_both_route() -> None:
    async def go() -> None:
        client = answering()
        app = gateway(client)
        for model in ("fast", "fast-model", "big"):
            assert (await chat(app, {"model": model, "messages": []})).status == 200
        assert [c.url.split("/v1")[0] for c in client.calls] == [FAST, FAST, BIG]

    run(go())


def test_unknown_model_is_404_model_not_found_listing_the_aliases() -> None:
    async def go() -> None:
        client = answering()
        sent = await chat(gateway(client), {"model": "gpt-4o", "messages": []})
        assert sent.status == 404
        assert sent.json()["error"] == {
            "message": "model 'gpt-4o' does not exist; configured: fast, big",
            "type": "invalid_request_error",
            "code": "model_not_found",
            "param": "model",
        }
        assert client.calls == []

    run(go())


@pytest.mark.parametrize("model", [123, ["fast"], {"name": "fast"}, True])
def test_a_model_that_is_not_a_string_is_400(model: object) -> None:
    async def go() -> None:
        client = answering()
        sent = await chat(gateway(client), {"model": model})
        assert sent.status == 400
        assert sent.json()["error"]["message"] == "'model' must be a string"
        assert sent.json()["error"]["param"] == "model"
        assert client.calls == []

    run(go())


def test_model_is_rewritten_for_the_upstream_and_the_rest_kept() -> None:
    async def go() -> None:
        client = answering()
        body = {"model": "big", "messages": [{"role": "user", "content": "hé"}], "temperature": 0.2}
        sent = await chat(gateway(client), body)
        assert sent.json() == {"from": "big"}
        assert only_call(client).json() == {**body, "model": "llama-70b-q4"}

    run(go())


def test_path_and_query_string_reach_the_upstream() -> None:
    async def go() -> None:
        client = answering()
        app = gateway(client)
        sent = await call_app(
            app, "POST", "/v1/embeddings", {"model": "fast", "input": "x"}, AUTH, b"api-version=2"
        )
        assert sent.status == 200
        assert only_call(client).url == FAST + "/v1/embeddings?api-version=2"

    run(go())


# -- request ids --------------------------------------------------------------------------------
def test_the_clients_request_id_passes_through_both_ways() -> None:
    async def go() -> None:
        client = answering()
        sent = await chat(gateway(client), {"model": "fast"}, [(b"x-request-id", b"my-trace-42")])
        assert sent.header(b"x-request-id") == b"my-trace-42"
        upstream = [v for k, v in only_call(client).headers if k == b"x-request-id"]
        assert upstream == [b"my-trace-42"]

    run(go())


def test_a_request_id_is_made_when_the_client_sends_none() -> None:
    async def go() -> None:
        client = answering()
        app = gateway(client)
        first = await chat(app, {"model": "fast"})
        second = await chat(app, {"model": "fast"})
        ids = [first.header(b"x-request-id"), second.header(b"x-request-id")]
        assert all(ids) and ids[0] != ids[1]
        assert [c.header(b"x-request-id") for c in client.calls] == ids

    run(go())


def test_an_over_long_request_id_is_replaced() -> None:
    async def go() -> None:
        client = answering()
        app = gateway(client)
        at_limit = b"r" * MAX_REQUEST_ID
        assert (await chat(app, {"model": "fast"}, [(b"x-request-id", at_limit)])).header(
            b"x-request-id"
        ) == at_limit
        too_long = b"r" * (MAX_REQUEST_ID + 1)
        sent = await chat(app, {"model": "fast"}, [(b"x-request-id", too_long)])
        ours = sent.header(b"x-request-id")
        assert ours is not None and ours != too_long and len(ours) <= MAX_REQUEST_ID
        upstream = [v for k, v in client.calls[-1].headers if k == b"x-request-id"]
        assert upstream == [ours]  # exactly one id upstream, and the same one

    run(go())


# -- credentials --------------------------------------------------------------------------------
def test_client_credentials_are_not_sent_upstream() -> None:
    async def go() -> None:
        client = answering()
        headers = [
            (b"x-api-key", CLIENT_KEY.encode()),
            (NODE_KEY, b"forged"),
            (b"content-type", b"application/json"),
            (b"x-custom", b"kept"),
        ]
        sent = await chat(gateway(client), {"model": "fast"}, headers)
        assert sent.status == 200
        names = [k for k, _ in only_call(client).headers]
        assert b"authorization" not in names and b"x-api-key" not in names and NODE_KEY not in names
        assert only_call(client).header(b"x-custom") == b"kept"
        assert CLIENT_KEY.encode() not in b"".join(v for _, v in only_call(client).headers)

    run(go())


def test_without_a_valid_client_key_nothing_goes_upstream() -> None:
    async def go() -> None:
        client = answering()
        app = gateway(client)
        for headers in ([], [(b"x-api-key", b"wrong")], [(b"x-api-key", NODE_KEY_VALUE.encode())]):
            sent = await call_app(app, "POST", "/v1/chat/completions", {"model": "fast"}, headers)
            assert sent.status == 401 and sent.header(b"www-authenticate") == b'Bearer realm="rolemesh"'
        assert client.calls == []

    run(go())


# -- bodies and failures ------------------------------------------------------------------------
def test_bad_bodies_are_400_and_413_before_any_upstream_call() -> None:
    async def go() -> None:
        client = answering()
        app = gateway(client, limits={"max_body_bytes": 64})
        assert (await chat(app, b"{not json")).json()["error"]["code"] == "invalid_json"
        assert (await chat(app, b"[1, 2]")).status == 400
        sent = await chat(app, {"model": "fast", "prompt": "x" * 100})
        assert sent.status == 413 and sent.json()["error"]["code"] == "request_too_large"
        assert client.calls == []

    run(go())


def test_an_unreachable_upstream_is_a_502_naming_it() -> None:
    async def go() -> None:
        client = FakeClient().on(
            FAST, Raise(UpstreamUnreachable(f"cannot connect to upstream fast ({FAST}): refused"))
        )
        sent = await chat(gateway(client), {"model": "fast"})
        assert sent.status == 502
        error = sent.json()["error"]
        assert error["code"] == "upstream_failed" and f"upstream fast ({FAST})" in error["message"]

    run(go())


def test_other_paths_and_methods() -> None:
    async def go() -> None:
        app = gateway(answering())
        assert (await call_app(app, "GET", "/v1/chat/completions", headers=AUTH)).status == 405
        assert (await call_app(app, "POST", "/v1/nothing-here", {"model": "fast"}, AUTH)).status == 404
        assert (await call_app(app, "POST", "/v1/responses", {"model": "fast"}, AUTH)).status == 200
        assert orjson.loads((await call_app(app, "GET", "/health")).body) == {"status": "ok"}

    run(go())


def test_default_model_given_by_its_openai_name_serves_requests_without_model() -> None:
    # The settings accept default_model as an alias or an openai_model_name; both must work.
    async def go() -> None:
        client = answering()
        settings = parse_settings(
            {
                "version": 1,
                "default_model": "fast-model",
                "auth": {"client_api_keys": [CLIENT_KEY]},
                "models": {"fast": {"type": "proxy", "proxy_url": FAST, "openai_model_name": "fast-model"}},
            },
            env={},
        )
        app = create_app(settings, client=client)  # type: ignore[arg-type]
        sent = await chat(app, {"messages": []})
        assert sent.status == 200 and sent.json() == {"from": "fast"}
        assert only_call(client).url == FAST + "/v1/chat/completions"

    run(go())


def test_a_body_with_a_utf8_byte_order_mark_is_accepted() -> None:
    async def go() -> None:
        client = answering()
        sent = await chat(gateway(client), b'\xef\xbb\xbf{"model": "big", "messages": []}')
        assert sent.status == 200 and sent.json() == {"from": "big"}

    run(go())


def test_paths_without_v1_work_as_their_v1_forms() -> None:
    async def go() -> None:
        client = answering()
        app = gateway(client)
        sent = await chat(app, {"model": "fast", "messages": []}, path="/chat/completions")
        assert sent.status == 200 and client.calls[-1].url == FAST + "/v1/chat/completions"
        models = await call_app(app, "GET", "/models", headers=AUTH)
        assert models.status == 200 and models.json()["object"] == "list"

    run(go())


def test_gateway_made_429_and_503_say_when_to_retry() -> None:
    async def go() -> None:
        client = FakeClient().on(FAST, Raise(UpstreamUnreachable("cannot connect to upstream fast")))
        app = gateway(client)
        assert (await chat(app, {"model": "fast"})).status == 502
        sent = await call_app(app, "GET", "/v1/models/fast", headers=AUTH)  # marked down by that
        assert sent.status == 503 and sent.header(b"retry-after") == b"5"

    run(go())


def test_an_upstream_key_is_sent_to_a_keyed_upstream_and_its_probes() -> None:
    async def go() -> None:
        client = answering()
        client.on(FAST + "/health", Reply.json(200, {"status": "ok"}))
        app = gateway(client, models={"fast": {"type": "proxy", "proxy_url": FAST, "api_key": "up-secret"}})
        await app.health.probe_all()
        assert all(c.header(b"authorization") == b"Bearer up-secret" for c in client.calls)
        sent = await chat(app, {"model": "fast"})
        assert sent.status == 200
        call = client.calls[-1]
        assert call.header(b"authorization") == b"Bearer up-secret"  # not the client's key
        assert call.header(b"authorization") != AUTH[0][1]

    run(go())
