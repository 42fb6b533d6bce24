"""CORS: off by default; with ``cors.allow_origins`` preflights are answered without a key and
every answer to an allowed origin, errors included, says the page may read it."""

from __future__ import annotations

from rolemesh_gateway.gateway.app import Gateway
from tests.fakeclient import FakeClient, Reply, call_app, run
from tests.test_inference import AUTH, FAST, gateway

PAGE = b"http://page.test:3000"


def cors_gateway(client: FakeClient, *origins: str) -> Gateway:
    return gateway(client, cors={"allow_origins": list(origins)})


def preflight(origin: bytes = PAGE) -> list[tuple[bytes, bytes]]:
    return [
        (b"origin", origin),
        (b"access-control-request-method", b"POST"),
        (b"access-control-request-headers", b"authorization, content-type"),
    ]


def test_off_by_default_and_upstream_cors_headers_never_leak() -> None:
    async def go() -> None:
        upstream_acao = [(b"access-control-allow-origin", b"*")]  # llama-server reflects any origin
        client = FakeClient().on(FAST, Reply.json(200, {"ok": 1}, headers=upstream_acao))
        app = gateway(client)
        sent = await call_app(app, "POST", "/v1/chat/completions", {}, [*AUTH, (b"origin", PAGE)])
        assert sent.status == 200 and sent.header(b"access-control-allow-origin") is None
        assert (await call_app(app, "OPTIONS", "/v1/chat/completions", headers=preflight())).status == 405

    run(go())


def test_preflight_is_answered_without_a_key() -> None:
    async def go() -> None:
        app = cors_gateway(FakeClient(), PAGE.decode())
        sent = await call_app(app, "OPTIONS", "/v1/chat/completions", headers=preflight())
        assert sent.status == 204
        assert sent.header(b"access-control-allow-origin") == PAGE
        assert sent.header(b"access-control-allow-headers") == b"authorization, content-type"
        assert b"POST" in (sent.header(b"access-control-allow-methods") or b"")
        assert sent.header(b"vary") == b"origin"

    run(go())


def test_answers_and_errors_to_an_allowed_origin_carry_the_header() -> None:
    async def go() -> None:
        client = FakeClient().on(FAST, Reply.json(200, {"ok": 1}))
        app = cors_gateway(client, PAGE.decode())
        ok = await call_app(app, "POST", "/v1/chat/completions", {}, [*AUTH, (b"origin", PAGE)])
        assert ok.status == 200 and ok.header_values(b"access-control-allow-origin") == [PAGE]
        assert b"x-request-id" in (ok.header(b"access-control-expose-headers") or b"")
        denied = await call_app(app, "POST", "/v1/chat/completions", {}, [(b"origin", PAGE)])
        assert denied.status == 401 and denied.header(b"access-control-allow-origin") == PAGE

    run(go())


def test_other_origins_get_nothing_and_star_allows_any() -> None:
    async def go() -> None:
        app = cors_gateway(FakeClient(), PAGE.decode())
        evil = b"http://evil.test"
        sent = await call_app(app, "OPTIONS", "/v1/chat/completions", headers=preflight(evil))
        assert sent.status == 405 and sent.header(b"access-control-allow-origin") is None
        anyone = cors_gateway(FakeClient(), "*")
        sent = await call_app(anyone, "OPTIONS", "/v1/models", headers=preflight(evil))
        assert sent.status == 204 and sent.header(b"access-control-allow-origin") == evil

    run(go())
