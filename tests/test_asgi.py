"""ASGI helpers: body limits, JSON bodies, dispatch, error answers and cancel-on-disconnect."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from typing import Any

import orjson
import pytest

from rolemesh_gateway.common.asgi import (
    WATCH_AFTER_S,
    Dispatcher,
    cancel_on_disconnect,
    header,
    lifespan,
    raw_target,
    read_body,
    read_json_object,
    send_error,
    send_json,
    sse_error_event,
)
from rolemesh_gateway.common.errors import (
    BadRequest,
    InvalidJSON,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    UpstreamTimeout,
)
from tests.fakeclient import Sent, run


class Receive:
    """An ASGI ``receive`` that hands out the given messages and counts how many were taken."""

    def __init__(self, *messages: dict[str, Any]) -> None:
        self.messages = list(messages)
        self.taken = 0

    async def __call__(self) -> dict[str, Any]:
        self.taken += 1
        if not self.messages:
            raise AssertionError("read past the end of the request")
        return self.messages.pop(0)


def body(data: bytes, more: bool = False) -> dict[str, Any]:
    return {"type": "http.request", "body": data, "more_body": more}


def length(n: int | str) -> list[tuple[bytes, bytes]]:
    return [(b"content-length", str(n).encode())]


# -- read_body ----------------------------------------------------------------------------------
def test_read_body_in_one_piece_and_in_chunks() -> None:
    async def go() -> None:
        assert await read_body(Receive(body(b"hello")), length(5), 10) == b"hello"
        chunks = Receive(body(b"ab", True), body(b"cd", True), body(b"e"))
        assert await read_body(chunks, [], 10) == b"abcde"
        assert await read_body(Receive(body(b"")), [], 10) == b""
        assert await read_body(Receive({"type": "http.request"}), [], 10) == b""

    run(go())


def test_declared_length_over_the_limit_is_refused_before_reading() -> None:
    async def go() -> None:
        receive = Receive(body(b"x" * 11))
        with pytest.raises(PayloadTooLarge) as info:
            await read_body(receive, length(11), 10)
        assert receive.taken == 0  # not a byte read
        assert info.value.status == 413
        assert info.value.message == (
            "request body of 11 bytes is over the limit of 10 bytes (limits.max_body_bytes)"
        )

    run(go())


def test_body_exactly_at_the_limit_is_accepted() -> None:
    async def go() -> None:
        assert await read_body(Receive(body(b"x" * 10)), length(10), 10) == b"x" * 10
        chunks = Receive(body(b"x" * 5, True), body(b"x" * 5))
        assert await read_body(chunks, [], 10) == b"x" * 10

    run(go())


def test_chunked_body_over_the_limit_is_refused_as_soon_as_it_crosses() -> None:
    async def go() -> None:
        receive = Receive(body(b"x" * 6, True), body(b"x" * 6, True), body(b"x" * 6, True), body(b""))
        with pytest.raises(PayloadTooLarge, match="over the limit of 10 bytes"):
            await read_body(receive, [], 10)
        assert receive.taken == 2  # stopped reading at the chunk that crossed the limit

    run(go())


def test_a_body_longer_than_declared_is_still_bounded() -> None:
    async def go() -> None:
        with pytest.raises(PayloadTooLarge):
            await read_body(Receive(body(b"x" * 50)), length(3), 10)
        with pytest.raises(PayloadTooLarge):
            await read_body(Receive(body(b"x" * 50)), length("not-a-number"), 10)

    run(go())


# -- read_json_object ----------------------------------------------------------------------------
def test_read_json_object_returns_the_raw_body_and_the_object() -> None:
    async def go() -> None:
        raw = b'{"model": "chat", "n": 1}'
        got_raw, data = await read_json_object(Receive(body(raw)), [], 100)
        assert got_raw == raw and data == {"model": "chat", "n": 1}

    run(go())


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b'{"a": 1,}', b"\xff\xfe"])
def test_invalid_json_is_400_invalid_json(raw: bytes) -> None:
    async def go() -> None:
        with pytest.raises(InvalidJSON, match=r"^request body is not valid JSON: ") as info:
            await read_json_object(Receive(body(raw)), [], 100)
        assert info.value.status == 400 and info.value.code == "invalid_json"

    run(go())


@pytest.mark.parametrize("raw", [b"[]", b'"s"', b"1", b"null", b"true", b'[{"model": "x"}]'])
def test_json_that_is_not_an_object_is_400(raw: bytes) -> None:
    async def go() -> None:
        with pytest.raises(BadRequest, match=r"^request body must be a JSON object$") as info:
            await read_json_object(Receive(body(raw)), [], 100)
        assert not isinstance(info.value, InvalidJSON)

    run(go())


def test_read_json_object_applies_the_limit() -> None:
    async def go() -> None:
        with pytest.raises(PayloadTooLarge):
            await read_json_object(Receive(body(b'{"a": "' + b"x" * 100 + b'"}')), [], 50)

    run(go())


# -- Dispatcher ---------------------------------------------------------------------------------
async def handler_a(scope: Any, receive: Any, send: Any) -> None: ...
async def handler_b(scope: Any, receive: Any, send: Any) -> None: ...
async def handler_c(scope: Any, receive: Any, send: Any) -> None: ...


def dispatcher() -> Dispatcher:
    d = Dispatcher()
    d.add("POST", "/v1/chat/completions", handler_a)
    d.add("GET", "/v1/models", handler_b)
    d.add_prefix("GET", "/v1/models/", handler_c)
    d.add_prefix("DELETE", "/v1/models/", handler_a)
    return d


def test_dispatch_exact_then_prefix() -> None:
    d = dispatcher()
    assert d.find("POST", "/v1/chat/completions") is handler_a
    assert d.find("GET", "/v1/models") is handler_b
    assert d.find("GET", "/v1/models/qwen") is handler_c
    assert d.find("DELETE", "/v1/models/qwen") is handler_a  # one prefix, two methods


def test_dispatch_404_for_unknown_paths_and_a_bare_prefix() -> None:
    d = dispatcher()
    for path in ("/v1/chat/completion", "/", "/v1/modelsx", "/v1/models/"):
        with pytest.raises(NotFound, match="no such endpoint"):
            d.find("GET", path)


def test_dispatch_405_lists_the_methods_allowed() -> None:
    d = dispatcher()
    with pytest.raises(MethodNotAllowed) as info:
        d.find("GET", "/v1/chat/completions")
    assert info.value.status == 405
    assert info.value.message == "/v1/chat/completions accepts POST, not GET"
    with pytest.raises(MethodNotAllowed, match="accepts GET, DELETE, not POST"):
        d.find("POST", "/v1/models/qwen")


# -- small pieces -------------------------------------------------------------------------------
def test_raw_target_keeps_the_encoding_and_the_query_string() -> None:
    assert raw_target({"path": "/v1/x", "query_string": b"a=1&b=%20"}) == "/v1/x?a=1&b=%20"
    assert raw_target({"path": "/v1/x", "query_string": b""}) == "/v1/x"
    assert raw_target({"path": "/v1/a/b", "raw_path": b"/v1/a%2Fb"}) == "/v1/a%2Fb"  # as received


@pytest.mark.parametrize(
    "path", ["/v1/a\tHTTP/1.0\tx", "/v1/a\x00b", "/v1/a\x7fb", "/v1/slots/../../slots", "/v1/./x"]
)
def test_raw_target_refuses_control_characters_and_dot_segments(path: str) -> None:
    with pytest.raises(BadRequest):
        raw_target({"path": path, "raw_path": path.encode("latin-1")})


def test_header_finds_the_first_value() -> None:
    hs = [(b"a", b"1"), (b"b", b"2"), (b"a", b"3")]
    assert header(hs, b"a") == b"1" and header(hs, b"c") is None


def test_send_json_and_send_error() -> None:
    async def go() -> None:
        sent = Sent()
        await send_json(sent, 201, {"ok": True}, [(b"x-request-id", b"r")])
        assert sent.status == 201 and sent.json() == {"ok": True}
        assert sent.header(b"content-type") == b"application/json"
        assert sent.header(b"content-length") == str(len(sent.body)).encode()
        assert sent.header(b"x-request-id") == b"r"

        sent = Sent()
        await send_error(sent, Unauthorized("invalid API key"))
        assert sent.status == 401 and sent.json()["error"]["code"] == "invalid_api_key"
        assert sent.header(b"www-authenticate") == b'Bearer realm="rolemesh"'

        sent = Sent()
        await send_error(sent, NotFound("nope"))
        assert sent.status == 404 and sent.header(b"www-authenticate") is None

    run(go())


def test_sse_error_event_is_one_data_event_with_the_openai_error() -> None:
    event = sse_error_event(UpstreamTimeout("node a did not send more of its answer in time"))
    assert event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n\n") == 1
    assert orjson.loads(event[len(b"data: ") :])["error"]["code"] == "upstream_timeout"


# -- cancel_on_disconnect -----------------------------------------------------------------------
def test_work_is_cancelled_when_the_client_disconnects() -> None:
    async def go() -> None:
        cancelled = asyncio.Event()

        async def work() -> None:
            try:
                await asyncio.sleep(3)  # an upstream request that takes long
            except asyncio.CancelledError:
                cancelled.set()
                raise

        async def receive() -> dict[str, Any]:
            return {"type": "http.disconnect"}

        await cancel_on_disconnect(receive, work())  # returns: nobody is left to answer
        assert cancelled.is_set()  # the work did not run to its end
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0  # the cancel was ours, and is settled

    run(go())


def test_quick_work_never_watches_the_client() -> None:
    async def go() -> None:
        receive = Receive()  # would fail the test if read
        done = []

        async def work() -> None:
            done.append(1)

        await cancel_on_disconnect(receive, work())
        assert done == [1] and receive.taken == 0
        await asyncio.sleep(WATCH_AFTER_S * 2)  # the watcher timer was cancelled too
        assert receive.taken == 0

    run(go())


def test_work_that_outlives_the_watch_delay_finishes_normally_while_the_client_stays() -> None:
    async def go() -> None:
        stay = asyncio.Event()

        async def receive() -> dict[str, Any]:
            await stay.wait()
            return {"type": "http.disconnect"}

        finished = []

        async def work() -> None:
            await asyncio.sleep(WATCH_AFTER_S * 3)
            finished.append(True)

        await cancel_on_disconnect(receive, work())
        assert finished == [True]

    run(go())


def test_errors_of_the_work_propagate() -> None:
    async def go() -> None:
        async def work() -> None:
            raise UpstreamTimeout("slow")

        with pytest.raises(UpstreamTimeout):
            await cancel_on_disconnect(Receive(), work())

    run(go())


def test_a_cancel_from_elsewhere_is_not_mistaken_for_a_disconnect() -> None:
    async def go() -> None:
        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        async def work() -> None:
            await asyncio.Event().wait()

        task = asyncio.get_running_loop().create_task(cancel_on_disconnect(receive, work()))
        await asyncio.sleep(WATCH_AFTER_S * 2)  # the watcher is running
        task.cancel()  # e.g. the server shutting down
        with pytest.raises(asyncio.CancelledError):
            await task

    run(go())


# -- lifespan -----------------------------------------------------------------------------------
def test_lifespan_runs_startup_and_shutdown() -> None:
    async def go() -> None:
        calls: list[str] = []

        async def startup() -> None:
            calls.append("startup")

        async def shutdown() -> None:
            calls.append("shutdown")

        sent = Sent()
        await lifespan(
            Receive({"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}), sent, startup, shutdown
        )
        assert calls == ["startup", "shutdown"]
        assert [m["type"] for m in sent.messages] == [
            "lifespan.startup.complete",
            "lifespan.shutdown.complete",
        ]

    run(go())


def test_lifespan_startup_failure_is_reported_to_the_server() -> None:
    async def go() -> None:
        async def startup() -> None:
            raise RuntimeError("redis is down")

        async def shutdown() -> None:
            raise AssertionError("no shutdown after a failed start-up")

        logging.getLogger("rolemesh").disabled = True  # its traceback is expected here
        try:
            sent = Sent()
            await lifespan(Receive({"type": "lifespan.startup"}), sent, startup, shutdown)
        finally:
            logging.getLogger("rolemesh").disabled = False
        assert sent.messages == [{"type": "lifespan.startup.failed", "message": "redis is down"}]

    run(go())


def test_start_up_objects_are_frozen_out_of_the_collectors_way() -> None:
    """A server process moves what start-up made out of the collector's reach (the tests'
    in-process servers do not: conftest turns it off for pytest's own process)."""
    code = (
        "import asyncio, gc\n"
        "from rolemesh_gateway.common.asgi import lifespan\n"
        "msgs = iter([{'type': 'lifespan.startup'}, {'type': 'lifespan.shutdown'}])\n"
        "async def receive(): return next(msgs)\n"
        "async def send(m): print(m['type'], gc.get_freeze_count() > 0)\n"
        "async def nothing(): pass\n"
        "asyncio.run(lifespan(receive, send, nothing, nothing))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["lifespan.startup.complete True", "lifespan.shutdown.complete True"]
