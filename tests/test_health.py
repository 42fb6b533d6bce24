"""Availability of proxy upstreams: background probes, and traffic that cannot connect."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from rolemesh_gateway.common.errors import UpstreamTimeout, UpstreamUnreachable
from rolemesh_gateway.gateway.health import HealthMonitor
from rolemesh_gateway.gateway.settings import Settings, parse_settings
from tests.fakeclient import FakeClient, Raise, Reply, run

A_HEALTH = "http://a.test:8001/health"
B_HEALTH = "http://b.test:8002/ready"


def settings() -> Settings:
    return parse_settings(
        {
            "version": 1,
            "default_model": "a",
            "probes": {"interval_s": 1, "timeout_s": 0.75},
            "models": {
                "a": {"type": "proxy", "proxy_url": "http://a.test:8001"},
                "b": {"type": "proxy", "proxy_url": "http://b.test:8002/", "health_path": "/ready"},
                "d": {"type": "discovered", "role": "chat"},
            },
        },
        env={},
    )


def monitor(client: FakeClient) -> HealthMonitor:
    return HealthMonitor(settings(), client)  # type: ignore[arg-type]


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def logged() -> Iterator[Lines]:
    logger = logging.getLogger("rolemesh.health")
    handler, old = Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


def test_nothing_is_available_before_the_first_probe() -> None:
    h = monitor(FakeClient())
    assert h.status("a") == (False, "not probed yet") and h.status("b") == (False, "not probed yet")


def test_probe_all_asks_each_health_path_with_the_probe_timeout() -> None:
    async def go() -> None:
        client = FakeClient().on(A_HEALTH, Reply.json(200, {})).on(B_HEALTH, Reply(404))
        h = monitor(client)
        await h.probe_all()
        health = [u for u in client.urls() if not u.endswith("/v1/models")]
        assert sorted(health) == [A_HEALTH, B_HEALTH]  # nothing for the discovered alias
        assert {c.timeout for c in client.calls} == {0.75}
        assert {c.method for c in client.calls} == {"GET"}
        assert h.status("a") == (True, "ok")
        assert h.status("b") == (True, "ok")  # answers, just without that path: up

    run(go())


def test_a_5xx_or_no_answer_is_down_with_the_reason() -> None:
    async def go() -> None:
        client = FakeClient()
        client.on(A_HEALTH, Reply.json(503, {"error": "Loading model"}))
        client.on(B_HEALTH, Raise(UpstreamUnreachable(f"cannot connect to {B_HEALTH}: Connection refused")))
        h = monitor(client)
        await h.probe_all()
        assert h.status("a") == (False, f"{A_HEALTH} answered HTTP 503")
        assert h.status("b") == (False, f"cannot connect to {B_HEALTH}: Connection refused")

    run(go())


def test_an_upstream_comes_back_on_the_next_good_probe() -> None:
    async def go() -> None:
        client = FakeClient()
        client.on(A_HEALTH, Reply(503), Reply(200))
        client.on(B_HEALTH, Raise(UpstreamTimeout("timed out")), Reply(200))
        h = monitor(client)
        await h.probe_all()
        assert not h.status("a")[0] and not h.status("b")[0]
        await h.probe_all()
        assert h.status("a") == (True, "ok") and h.status("b") == (True, "ok")

    run(go())


def test_traffic_that_cannot_connect_marks_down_until_the_next_good_probe() -> None:
    async def go() -> None:
        client = FakeClient(default=Reply(200))
        h = monitor(client)
        await h.probe_all()
        h.mark_failed("a", "cannot connect to upstream a (http://a.test:8001): Connection refused")
        assert h.status("a") == (
            False,
            "cannot connect to upstream a (http://a.test:8001): Connection refused",
        )
        assert h.status("b") == (True, "ok")
        await h.probe_all()
        assert h.status("a") == (True, "ok")

    run(go())


def test_mark_failed_of_an_alias_without_a_probe_is_ignored() -> None:
    h = monitor(FakeClient())
    h.mark_failed("d", "whatever")  # a discovered alias: its nodes have their own health
    h.mark_failed("no-such-alias", "whatever")
    with pytest.raises(KeyError):
        h.status("d")


def test_a_slow_probe_does_not_hold_up_the_others() -> None:
    async def go() -> None:
        gate = asyncio.Event()
        client = FakeClient().on(A_HEALTH, Reply(200, gate=gate)).on(B_HEALTH, Reply(200))
        h = monitor(client)
        probing = asyncio.get_running_loop().create_task(h.probe_all())
        for _ in range(1000):
            if h.status("b")[0]:
                break
            await asyncio.sleep(0.001)
        assert h.status("b") == (True, "ok") and h.status("a") == (False, "not probed yet")
        gate.set()
        await probing
        assert h.status("a") == (True, "ok")

    run(go())


def test_only_changes_are_logged(logged: Lines) -> None:
    async def go() -> None:
        client = FakeClient(default=Reply(200))
        h = monitor(client)
        for _ in range(3):
            await h.probe_all()
        assert sorted(logged.lines) == [
            "upstream a is now available (ok)",
            "upstream b is now available (ok)",
        ]
        h.mark_failed("a", "refused")
        h.mark_failed("a", "refused")
        assert logged.lines[-1] == "upstream a is now unavailable (refused)" and len(logged.lines) == 3

    run(go())
