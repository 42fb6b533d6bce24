"""Relaying an answer to the client: header hygiene, buffered vs streamed, and broken streams."""

from __future__ import annotations

import orjson
import pytest

from rolemesh_gateway.common.config import Timeouts
from rolemesh_gateway.common.errors import StreamBroken, UpstreamFailed, UpstreamTimeout
from rolemesh_gateway.common.protocol import NODE_KEY
from rolemesh_gateway.common.relay import (
    BUFFER_MAX,
    SSE_HEADERS,
    pass_through,
    relay,
    response_headers,
    upstream_headers,
)
from tests.fakeclient import FakeClient, FakeResponse, Reply, Sent, broken, run

RID = [(b"x-request-id", b"rid-7")]


def bodies(sent: Sent) -> list[dict[str, object]]:
    return [m for m in sent.messages if m["type"] == "http.response.body"]


# -- header hygiene -----------------------------------------------------------------------------
def test_client_credentials_and_hop_by_hop_headers_never_go_upstream() -> None:
    client = [
        (b"authorization", b"Bearer client-key"),
        (b"x-api-key", b"client-key"),
        (NODE_KEY, b"forged-node-key"),
        (b"proxy-authorization", b"Basic x"),
        (b"connection", b"keep-alive, x-trace"),
        (b"keep-alive", b"timeout=5"),
        (b"te", b"trailers"),
        (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"h2c"),
        (b"host", b"gateway:8000"),
        (b"content-length", b"2"),
        (b"expect", b"100-continue"),
        (b"content-type", b"application/json"),
        (b"x-trace", b"1"),
        (b"user-agent", b"OpenAI/Python"),
    ]
    # x-trace is named in Connection: hop-by-hop too (RFC 9110 7.6.1), so it stays here.
    assert upstream_headers(client, RID) == [
        (b"content-type", b"application/json"),
        (b"user-agent", b"OpenAI/Python"),
        (b"x-request-id", b"rid-7"),
    ]


def test_upstream_hop_by_hop_server_and_date_are_dropped_from_answers() -> None:
    raw = [
        (b"content-type", b"text/event-stream"),
        (b"transfer-encoding", b"chunked"),
        (b"connection", b"close"),
        (b"keep-alive", b"timeout=5"),
        (b"content-length", b"10"),
        (b"server", b"llama.cpp"),
        (b"date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
        (b"x-slot", b"0"),
        (b"set-cookie", b"a=b"),
    ]
    assert response_headers(raw) == [
        (b"content-type", b"text/event-stream"),
        (b"x-slot", b"0"),
        (b"set-cookie", b"a=b"),
    ]


# -- buffered ------------------------------------------------------------------------------------
def test_a_body_with_a_length_is_sent_in_one_piece_with_our_length() -> None:
    async def go() -> None:
        resp = FakeResponse(Reply.json(200, {"ok": True}, headers=[(b"server", b"llama")]))
        sent = Sent()
        assert await relay(resp, sent, RID, "node a") == len(b'{"ok":true}')
        assert sent.status == 200 and sent.json() == {"ok": True}
        assert sent.header_values(b"content-length") == [b"11"]
        assert sent.header(b"x-request-id") == b"rid-7" and sent.header(b"server") is None
        assert len(bodies(sent)) == 1 and sent.finished

    run(go())


def test_an_error_while_reading_a_buffered_body_propagates_before_anything_is_sent() -> None:
    async def go() -> None:
        resp = FakeResponse(Reply(200, b"{", headers=[(b"content-length", b"10")], break_with=broken()))
        sent = Sent()
        with pytest.raises(UpstreamFailed):
            await relay(resp, sent, RID, "node a")
        assert sent.messages == []  # the caller can still answer cleanly, or retry

    run(go())


# -- streamed -----------------------------------------------------------------------------------
def test_sse_is_relayed_chunk_by_chunk_with_anti_buffering_headers() -> None:
    async def go() -> None:
        events = [b'data: {"n":1}\n\n', b'data: {"n":2}\n\n', b"data: [DONE]\n\n"]
        resp = FakeResponse(Reply.sse(*events))
        sent = Sent()
        assert await relay(resp, sent, RID, "node a") == sum(map(len, events))
        assert [m["body"] for m in bodies(sent)] == [*events, b""]
        assert all(m["more_body"] for m in bodies(sent)[:-1]) and sent.finished
        assert sent.header(b"x-accel-buffering") == b"no" and sent.header(b"cache-control") == b"no-cache"
        assert sent.header(b"content-length") is None and sent.header(b"transfer-encoding") is None

    run(go())


def test_sse_headers_the_upstream_already_sent_are_not_duplicated() -> None:
    async def go() -> None:
        resp = FakeResponse(
            Reply.sse(
                b"data: x\n\n",
                headers=[
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-store"),
                    (b"x-accel-buffering", b"no"),
                ],
            )
        )
        sent = Sent()
        await relay(resp, sent, [], "node a")
        assert sent.header_values(b"cache-control") == [b"no-store"]  # the upstream's own value
        assert sent.header_values(b"x-accel-buffering") == [b"no"]
        assert {name for name, _ in SSE_HEADERS} <= {name for name, _ in sent.headers}

    run(go())


def test_non_sse_bodies_get_no_sse_headers() -> None:
    async def go() -> None:
        resp = FakeResponse(
            Reply(200, headers=[(b"content-type", b"application/x-ndjson")], chunks=[b"{}\n"])
        )
        sent = Sent()
        await relay(resp, sent, [], "node a")
        assert sent.header(b"x-accel-buffering") is None and sent.header(b"cache-control") is None
        assert sent.body == b"{}\n"

    run(go())


def test_a_large_body_with_a_length_is_streamed_and_keeps_its_length() -> None:
    async def go() -> None:
        size = BUFFER_MAX + 1
        part = b"x" * (size // 2)
        chunks = [part, b"x" * (size - len(part))]
        resp = FakeResponse(Reply(200, chunks=chunks, headers=[(b"content-length", b"%d" % size)]))
        sent = Sent()
        assert await relay(resp, sent, [], "node a") == size
        assert sent.header_values(b"content-length") == [b"%d" % size]
        assert len(bodies(sent)) == 3  # two pieces as they came, then the end

    run(go())


def test_sse_broken_mid_stream_ends_with_an_error_event_and_raises_stream_broken() -> None:
    async def go() -> None:
        cause = UpstreamTimeout("node a did not send more of its answer in time")
        resp = FakeResponse(Reply.sse(b"data: 1\n\n", b"data: 2\n\n", break_with=cause))
        sent = Sent()
        with pytest.raises(StreamBroken) as info:
            await relay(resp, sent, [], "node a")
        assert info.value.error is cause
        assert sent.status == 200
        *data, last = bodies(sent)
        assert [m["body"] for m in data] == [b"data: 1\n\n", b"data: 2\n\n"]
        assert last["more_body"] is False and last["body"].startswith(b"data: ")
        error = orjson.loads(last["body"][len(b"data: ") :])["error"]
        assert error["code"] == "upstream_timeout" and "node a" in error["message"]

    run(go())


def test_a_non_sse_stream_broken_is_left_unfinished() -> None:
    async def go() -> None:
        resp = FakeResponse(Reply(200, chunks=[b"partial"], break_with=broken("node a")))
        sent = Sent()
        with pytest.raises(StreamBroken):
            await relay(resp, sent, [], "node a")
        assert sent.body == b"partial"
        assert not sent.finished  # no final message: the server closes, the client sees a cut body

    run(go())


# -- pass_through -------------------------------------------------------------------------------
def test_pass_through_relays_releases_and_swallows_a_told_break() -> None:
    async def go() -> None:
        client = FakeClient().on("http://up/v1/x", Reply.sse(b"data: 1\n\n", break_with=broken()))
        sent = Sent()
        await pass_through(
            client,  # type: ignore[arg-type]
            "POST",
            "http://up/v1/x",
            [(b"content-type", b"application/json")],
            b"{}",
            Timeouts(),
            sent,
            RID,
            "upstream x",
        )
        assert sent.status == 200 and b"upstream_failed" in sent.body
        assert client.all_released() and len(client.responses) == 1
        (call,) = client.calls
        assert (call.method, call.body, call.target) == ("POST", b"{}", "upstream x")

    run(go())


def test_pass_through_relays_a_5xx_as_is() -> None:
    async def go() -> None:
        client = FakeClient().on("http://up/", Reply.json(503, {"error": {"message": "Loading model"}}))
        sent = Sent()
        await pass_through(client, "POST", "http://up/", [], b"{}", Timeouts(), sent, [], "u")  # type: ignore[arg-type]
        assert sent.status == 503 and sent.json() == {"error": {"message": "Loading model"}}
        assert client.all_released()

    run(go())


def test_headers_named_in_connection_are_dropped_from_answers_too() -> None:
    """Audit finding 11 (RFC 9110 7.6.1): a header the upstream names in Connection is hop-by-hop."""
    raw = [(b"content-type", b"application/json"), (b"connection", b"keep-alive, X-Hop"), (b"x-hop", b"1")]
    assert response_headers(raw) == [(b"content-type", b"application/json")]
    assert response_headers([(b"x-hop", b"1")]) == [(b"x-hop", b"1")]  # not named: kept
