"""Fallbacks between aliases: which failures move a request on, and that nothing sent is ever sent twice.

Unit tests of the held-back answer (:class:`Peek`) and of the rewrite, then the in-process
gateway in front of fake upstreams (the real llama-server's too-long prompt is in
tests/e2e/test_fallbacks_llama.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rolemesh_gateway.common.asgi import Message
from rolemesh_gateway.common.errors import (
    ConfigError,
    NoUpstreamAvailable,
    QueueFull,
    QueueTimeout,
    UpstreamTimeout,
)
from rolemesh_gateway.gateway.fallbacks import Declined, Peek, reason_of, retarget
from rolemesh_gateway.gateway.routes import Outbound
from rolemesh_gateway.gateway.settings import parse_settings
from tests.conftest import CLIENT_KEY, NODE_KEY, GatewayProcess
from tests.fakeclient import run
from tests.fakes import FakeUpstream

Up = Callable[..., FakeUpstream]
Gw = Callable[..., GatewayProcess]

#: What the llama-server build the e2e tests use answers to a prompt longer than ``-c``.
TOO_LONG = (
    b'{"error":{"code":400,"message":"request (628 tokens) exceeds the available context size (256 '
    b'tokens), try increasing it","type":"exceed_context_size_error","n_prompt_tokens":628,"n_ctx":256}}'
)


def head(status: int) -> Message:
    headers = [(b"content-type", b"application/json")]
    return {"type": "http.response.start", "status": status, "headers": headers}


def body(data: bytes, more: bool = False) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": more}


async def through_peek(*messages: Message) -> list[Message]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    peek = Peek(send)
    for m in messages:
        await peek(m)
    return sent


# -- Peek: what is held back, what passes ----------------------------------------------------------
def test_a_too_long_prompt_400_is_declined_before_anything_reaches_the_client() -> None:
    sent: list[Message] = []

    async def go() -> None:
        async def send(message: Message) -> None:
            sent.append(message)

        peek = Peek(send)
        await peek(head(400))
        with pytest.raises(Declined) as exc:
            await peek(body(TOO_LONG))
        assert exc.value.reason == "context_too_long"

    run(go())
    assert sent == []


@pytest.mark.parametrize("status", [502, 503, 504])
def test_a_node_unwell_answer_is_declined(status: int) -> None:
    async def go() -> None:
        with pytest.raises(Declined) as exc:
            await through_peek(head(status), body(b'{"error":{"message":"loading model"}}'))
        assert (exc.value.reason, exc.value.status) == ("unavailable", status)

    run(go())


def test_other_answers_pass_unchanged_even_a_400() -> None:
    async def go() -> None:
        bad = b'{"error":{"code":400,"message":"messages is required","type":"invalid_request_error"}}'
        assert await through_peek(head(400), body(bad)) == [head(400), body(bad)]
        ok = [head(200), body(b"data: 1\n\n", more=True), body(b"data: 2\n\n", more=True), body(b"")]
        assert await through_peek(*ok) == ok
        # A 400 streamed in pieces is not judged by its first piece: it passes.
        assert await through_peek(head(400), body(b"exceed_context_size_error", more=True)) == [
            head(400),
            body(b"exceed_context_size_error", more=True),
        ]

    run(go())


def test_reasons_of_route_failures() -> None:
    assert reason_of(QueueFull("x")) == "queue_full"
    assert reason_of(QueueTimeout("x")) == "queue_timeout"
    assert reason_of(NoUpstreamAvailable("x")) == "no_upstream"
    assert reason_of(UpstreamTimeout("x")) == "upstream_failed"


def test_retarget_rewrites_model_in_the_body_or_the_query_and_names_the_alias() -> None:
    out = Outbound("POST", "/v1/chat/completions", [], b'{"model":"planner","stream":true}', [(b"a", b"b")])
    new = retarget(out, "writer-role", "writer")
    assert orjson.loads(new.body) == {"model": "writer-role", "stream": True}
    assert new.reply_headers == [(b"x-rolemesh-alias", b"writer")]
    assert out.body == b'{"model":"planner","stream":true}'  # the original is left alone
    props = Outbound("GET", "/props?model=planner&x=1", [], b"", [])
    assert retarget(props, "writer", "writer").target == "/props?x=1&model=writer"


# -- config ----------------------------------------------------------------------------------------
def settings_with(models: dict[str, Any]) -> Any:
    return parse_settings({"version": 1, "default_model": "planner", "models": models}, env={})


def test_a_cycle_through_other_aliases_is_refused_in_one_line() -> None:
    models = {
        "planner": {"type": "discovered", "role": "planner", "fallbacks": ["writer"]},
        "writer": {"type": "discovered", "role": "writer", "fallbacks": ["coder"]},
        "coder": {"type": "discovered", "role": "coder", "fallbacks": ["planner"]},
    }
    with pytest.raises(ConfigError) as exc:
        settings_with(models)
    assert str(exc.value) == "config: models.planner.fallbacks: cycle planner -> writer -> coder -> planner"


@pytest.mark.parametrize(
    ("fallbacks", "expected"),
    [
        (["ghost"], "models.planner.fallbacks: 'ghost' names no alias; allowed: planner, writer"),
        (["planner"], "models.planner.fallbacks: cycle planner -> planner"),
        (["writer"] * 6, "models.planner.fallbacks: tuple should have at most 5 items"),
    ],
)
def test_bad_fallbacks_are_refused(fallbacks: list[str], expected: str) -> None:
    models = {
        "planner": {"type": "discovered", "role": "planner", "fallbacks": fallbacks},
        "writer": {"type": "discovered", "role": "writer"},
    }
    with pytest.raises(ConfigError) as exc:
        settings_with(models)
    assert expected in str(exc.value) and "\n" not in str(exc.value)


def test_a_chain_longer_than_five_through_other_aliases_is_refused() -> None:
    names = ["planner", "a", "b", "c", "d", "e", "f"]
    models: dict[str, Any] = {n: {"type": "discovered", "role": n} for n in names}
    for here, nxt in itertools.pairwise(names):
        models[here]["fallbacks"] = [nxt]
    with pytest.raises(ConfigError, match=r"chain planner -> a -> b -> c -> d -> e -> f tries more than 5"):
        settings_with(models)
    del models["e"]["fallbacks"]
    assert settings_with(models).fallback_chain("planner") == ("a", "b", "c", "d", "e")


# -- through the gateway ---------------------------------------------------------------------------
def gateway_config(planner: dict[str, Any], writer_url: str) -> dict[str, Any]:
    return {
        "version": 1,
        "default_model": "planner",
        "auth": {"client_api_keys": [CLIENT_KEY], "node_api_keys": [NODE_KEY]},
        "probes": {"interval_s": 0.3, "timeout_s": 0.5},
        "models": {
            "planner": {**planner, "fallbacks": ["writer"]},
            "writer": {"type": "proxy", "proxy_url": writer_url, "upstream_model": "writer-model"},
        },
    }


def fallbacks_counted(gw: GatewayProcess) -> dict[tuple[str, str, str], float]:
    with gw.client() as c:
        text = c.get("/metrics").text
    return {
        (s.labels["from"], s.labels["to"], s.labels["reason"]): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "rolemesh_fallbacks_total"
    }


def test_no_node_for_planner_is_served_by_writer_with_the_header(upstreams: Up, gateway: Gw) -> None:
    writer = upstreams("writer")
    gw = gateway(gateway_config({"type": "discovered", "role": "planner"}, writer.url))
    with gw.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "planner", "messages": []})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hello from writer"
        assert r.headers["x-rolemesh-alias"] == "writer"
        assert writer.seen[-1].body["model"] == "writer-model"  # rewritten for the alias that serves
        with c.stream("POST", "/v1/chat/completions", json={"model": "planner", "stream": True}) as s:
            assert s.headers["x-rolemesh-alias"] == "writer"
            text = "".join(s.iter_text())
        assert "t0 " in text and text.endswith("data: [DONE]\n\n")
        # An alias answering for itself says so too.
        itself = c.post("/v1/chat/completions", json={"model": "writer"})
        assert itself.headers["x-rolemesh-alias"] == "writer"
    assert fallbacks_counted(gw) == {("planner", "writer", "no_upstream"): 2.0}


def test_an_upstream_that_is_down_or_loading_moves_on(upstreams: Up, gateway: Gw) -> None:
    planner, writer = upstreams("planner", status=503), upstreams("writer")
    gw = gateway(gateway_config({"type": "proxy", "proxy_url": planner.url}, writer.url))
    with gw.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "planner"})
    assert r.status_code == 200 and r.headers["x-rolemesh-alias"] == "writer"
    assert len(planner.seen) == 1
    assert fallbacks_counted(gw) == {("planner", "writer", "unavailable"): 1.0}


def test_the_last_alias_answers_as_it_would_without_fallbacks(upstreams: Up, gateway: Gw) -> None:
    writer = upstreams("writer", status=503)
    gw = gateway(gateway_config({"type": "discovered", "role": "planner"}, writer.url))
    with gw.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "planner"})
    assert r.status_code == 503 and r.json()["error"]["message"] == "writer failing"
    assert r.headers["x-rolemesh-alias"] == "writer"


def test_a_stream_that_breaks_mid_answer_is_not_retried(upstreams: Up, gateway: Gw) -> None:
    planner, writer = upstreams("planner", cut_stream=True), upstreams("writer")
    gw = gateway(gateway_config({"type": "proxy", "proxy_url": planner.url}, writer.url))
    body = {"model": "planner", "stream": True}
    with gw.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as s:
        assert s.status_code == 200 and s.headers["x-rolemesh-alias"] == "planner"
        text = "".join(s.iter_text())
    assert "t0 " in text and '"error"' in text  # the client was told in-band
    assert writer.seen == [] and fallbacks_counted(gw) == {}


def test_a_client_error_is_the_clients_and_never_falls_back(upstreams: Up, gateway: Gw) -> None:
    planner, writer = upstreams("planner", status=404), upstreams("writer")
    gw = gateway(gateway_config({"type": "proxy", "proxy_url": planner.url}, writer.url))
    with gw.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "planner"})
    assert r.status_code == 404 and r.headers["x-rolemesh-alias"] == "planner"
    assert writer.seen == []


def test_a_key_limited_to_some_models_is_never_served_by_another(upstreams: Up, gateway: Gw) -> None:
    writer = upstreams("writer")
    config = gateway_config({"type": "discovered", "role": "planner"}, writer.url)
    only_planner = "sk-only-planner"
    config["auth"]["client_api_keys"].append(
        {"name": "planner-only", "key": only_planner, "models": ["planner"]}
    )
    gw = gateway(config)
    with gw.client(only_planner) as c:
        r = c.post("/v1/chat/completions", json={"model": "planner", "messages": []})
    assert r.status_code == 503 and "planner" in r.json()["error"]["message"]
    assert writer.seen == [] and fallbacks_counted(gw) == {}
    with gw.client() as c:  # a key that may use writer still falls back
        r = c.post("/v1/chat/completions", json={"model": "planner", "messages": []})
    assert r.status_code == 200 and r.headers["x-rolemesh-alias"] == "writer"
