"""The agent's registrar against a scripted gateway: register, heartbeat, re-register, back off."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from rolemesh_gateway.agent.config import AgentConfig, parse_config
from rolemesh_gateway.agent.registration import Registrar
from rolemesh_gateway.common.errors import Refused, UpstreamUnreachable
from rolemesh_gateway.common.protocol import NODE_KEY
from rolemesh_gateway.common.version import __version__
from tests.fakeclient import Call, FakeClient, Raise, Reply, run

GW = "http://gw.test:8000"
REGISTER = f"{GW}/v1/nodes/register"
HEARTBEAT = f"{GW}/v1/nodes/heartbeat"
DELETE = f"{GW}/v1/nodes/n1"
NODE_KEY_VALUE = "node-secret"
REGISTERED = Reply.json(201, {"node_id": "n1", "stale_after_s": 30.0, "heartbeat_interval_hint_s": 10.0})
UNREACHABLE = Raise(UpstreamUnreachable(f"cannot connect to gateway {GW}: Connection refused"))


def config(interval_s: float = 2.0, **extra: Any) -> AgentConfig:
    return parse_config(
        {
            "node_id": "n1",
            "gateway_url": GW,
            "node_key": NODE_KEY_VALUE,
            "port": 8091,
            "heartbeat_interval_s": interval_s,
            "gateway_timeout_s": 3.0,
            "roles": {
                "chat": {"proxy_url": "http://127.0.0.1:9001"},
                "code": {"proxy_url": "http://127.0.0.1:9002"},
            },
            **extra,
        },
        env={},
    )


class StubSupervisor:
    """What the registrar asks of the supervisor; ``wait_for_change`` only records the delay."""

    def __init__(self, *roles: str, slot_urls: tuple[str, ...] = ()) -> None:
        self.roles = list(roles)
        self.slots = list(slot_urls)
        self.waits: list[float] = []
        #: After this many waits, block (so a test can look and then cancel the loop).
        self.hold_after: int | None = None
        #: Sleep for real for the delay asked (a test of the loop's timing).
        self.real_time = False
        #: Roles served on demand whose server is not running (sent as cold_roles).
        self.cold: list[str] | None = None

    def cold_roles(self) -> list[str] | None:
        return self.cold

    def ready_roles(self) -> list[str]:
        return list(self.roles)

    def slot_urls(self) -> list[str]:
        return list(self.slots)

    def ready_backends(self) -> dict[str, object]:
        return {}  # no server to ask about its model

    async def wait_for_change(self, timeout_s: float) -> None:
        self.waits.append(timeout_s)
        if self.hold_after is not None and len(self.waits) >= self.hold_after:
            await asyncio.Event().wait()
        await asyncio.sleep(timeout_s if self.real_time else 0)


def registrar(
    client: FakeClient, sup: StubSupervisor, cfg: AgentConfig | None = None, inflight: int = 0
) -> Registrar:
    return Registrar(cfg or config(), client, sup, lambda: inflight)  # type: ignore[arg-type]


def posted(call: Call) -> tuple[str, str, Any]:
    return call.method, call.url, call.json() if call.body else None


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.getMessage()))

    def warnings(self) -> list[str]:
        return [m for level, m in self.lines if level >= logging.WARNING]


@pytest.fixture
def logged() -> Iterator[Lines]:
    logger = logging.getLogger("rolemesh.agent.registration")
    handler, old = Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


# -- one step at a time ------------------------------------------------------------------------
def test_registers_the_ready_roles_with_its_key_and_load() -> None:
    async def go() -> None:
        client = FakeClient().on(REGISTER, REGISTERED)
        r = registrar(client, StubSupervisor("chat"), inflight=2)
        await r.tick()
        (call,) = client.calls
        assert posted(call) == (
            "POST",
            REGISTER,
            {
                "node_id": "n1",
                "base_url": "http://127.0.0.1:8091",
                "roles": ["chat"],
                "version": __version__,
                "inflight": 2,
            },
        )
        assert call.header(NODE_KEY) == NODE_KEY_VALUE.encode()
        assert call.header(b"content-type") == b"application/json"
        assert call.timeout == 3.0 and call.target == f"gateway {GW}"
        assert r.registered == ("chat",)

    run(go())


def test_nothing_ready_means_nothing_sent_then_a_ready_role_registers_at_once() -> None:
    async def go() -> None:
        client = FakeClient().on(REGISTER, REGISTERED)
        sup = StubSupervisor()
        r = registrar(client, sup)
        await r.tick()
        assert client.calls == [] and r.registered is None
        sup.roles = ["code"]
        await r.tick()
        assert [posted(c)[2]["roles"] for c in client.calls] == [["code"]]

    run(go())


def test_heartbeats_while_the_roles_stay_the_same_with_slot_load() -> None:
    async def go() -> None:
        client = FakeClient().on(REGISTER, REGISTERED).on(HEARTBEAT, Reply.json(200, {"status": "ok"}))
        client.on(
            "http://127.0.0.1:9001/slots",
            Reply.json(200, [{"is_processing": True}, {"is_processing": False}]),
        )
        client.on("http://127.0.0.1:9002/slots", Reply.json(200, [{"state": 1}, {"state": 0}, {"state": 0}]))
        client.on("http://127.0.0.1:9003/slots", Reply(404, b"not offered"))
        sup = StubSupervisor(
            "chat",
            slot_urls=(
                "http://127.0.0.1:9001/slots",
                "http://127.0.0.1:9002/slots",
                "http://127.0.0.1:9003/slots",
            ),
        )
        r = registrar(client, sup, inflight=1)
        await r.tick()
        await r.tick()
        heartbeats = [c for c in client.calls if c.url == HEARTBEAT]
        assert len(heartbeats) == 1
        assert heartbeats[0].json() == {"node_id": "n1", "inflight": 1, "slots_total": 5, "slots_busy": 2}
        assert heartbeats[0].header(NODE_KEY) == NODE_KEY_VALUE.encode()
        assert len([c for c in client.calls if c.url == REGISTER]) == 1

    run(go())


def test_changed_roles_register_again_and_no_role_deregisters() -> None:
    async def go() -> None:
        client = FakeClient().on(REGISTER, REGISTERED).on(DELETE, Reply.json(200, {}))
        sup = StubSupervisor("chat")
        r = registrar(client, sup)
        await r.tick()
        sup.roles = ["chat", "code"]
        await r.tick()
        sup.roles = []
        await r.tick()
        assert [(c.method, c.url) for c in client.calls] == [
            ("POST", REGISTER),
            ("POST", REGISTER),
            ("DELETE", DELETE),
        ]
        assert client.calls[1].json()["roles"] == ["chat", "code"]
        assert client.calls[2].header(NODE_KEY) == NODE_KEY_VALUE.encode() and client.calls[2].body == b""
        assert r.registered is None
        await r.tick()
        assert len(client.calls) == 3  # left, and stays away quietly

    run(go())


def test_heartbeat_answered_404_registers_again_at_once() -> None:
    async def go() -> None:
        client = FakeClient().on(REGISTER, REGISTERED)
        client.on(HEARTBEAT, Reply.json(404, {"error": {"message": "node 'n1' is not registered"}}))
        r = registrar(client, StubSupervisor("chat"))
        await r.tick()
        await r.tick()  # the gateway restarted and forgot us
        assert [c.url for c in client.calls] == [REGISTER, HEARTBEAT, REGISTER]
        assert r.registered == ("chat",)

    run(go())


def test_a_refused_registration_names_the_action_and_hints_at_the_key() -> None:
    async def go() -> None:
        client = FakeClient().on(
            REGISTER, Reply.json(401, {"error": {"message": "missing or invalid node key"}})
        )
        r = registrar(client, StubSupervisor("chat"))
        with pytest.raises(Refused) as info:
            await r.tick()
        assert info.value.message == (
            "gateway refused registration with HTTP 401: missing or invalid node key; "
            "node_key must be one of the gateway's auth.node_api_keys"
        )
        assert r.registered is None

    run(go())


def test_a_refused_heartbeat_names_the_action() -> None:
    async def go() -> None:
        client = FakeClient().on(REGISTER, REGISTERED).on(HEARTBEAT, Reply(500, b"oops"))
        r = registrar(client, StubSupervisor("chat"))
        await r.tick()
        with pytest.raises(Refused, match=r"^gateway refused heartbeat with HTTP 500: None$") as info:
            await r.tick()
        assert "node_key" not in info.value.message  # the hint is for 401 only

    run(go())


def test_a_heartbeat_refused_with_401_hints_at_the_key() -> None:
    async def go() -> None:
        client = FakeClient().on(REGISTER, REGISTERED)
        client.on(HEARTBEAT, Reply.json(401, {"error": {"message": "missing or invalid node key"}}))
        r = registrar(client, StubSupervisor("chat"))
        await r.tick()
        with pytest.raises(
            Refused, match=r"^gateway refused heartbeat with HTTP 401: .*auth\.node_api_keys$"
        ):
            await r.tick()

    run(go())


def test_deregister_only_when_registered_and_404_is_fine() -> None:
    async def go() -> None:
        client = FakeClient().on(REGISTER, REGISTERED).on(DELETE, Reply.json(404, {}), Reply.json(500, {}))
        r = registrar(client, StubSupervisor("chat"))
        await r.deregister()
        assert client.calls == []
        await r.tick()
        await r.deregister()  # the gateway had already forgotten us: fine
        assert r.registered is None
        await r.tick()
        with pytest.raises(Refused, match=r"^gateway refused deregistration with HTTP 500"):
            await r.deregister()

    run(go())


def test_warns_when_the_heartbeat_interval_is_not_below_the_gateways_stale_timeout(logged: Lines) -> None:
    async def go() -> None:
        answer = Reply.json(201, {"node_id": "n1", "stale_after_s": 9.0, "heartbeat_interval_hint_s": 3.0})
        client = FakeClient().on(REGISTER, answer)
        await registrar(client, StubSupervisor("chat"), config(interval_s=10.0)).tick()
        (warning,) = logged.warnings()
        assert "heartbeat_interval_s (10s) is not below the gateway's stale timeout (9s)" in warning
        assert "use at most 3s" in warning

    run(go())


def test_an_answer_without_the_hint_is_still_a_registration(logged: Lines) -> None:
    async def go() -> None:
        client = FakeClient().on(REGISTER, Reply(200, b""))
        r = registrar(client, StubSupervisor("chat"))
        await r.tick()
        assert r.registered == ("chat",) and logged.warnings() == []

    run(go())


# -- the loop ----------------------------------------------------------------------------------
async def run_until(r: Registrar, sup: StubSupervisor, waits: int) -> None:
    sup.hold_after = waits
    task = asyncio.get_running_loop().create_task(r.run())
    for _ in range(5000):
        if len(sup.waits) >= waits:
            break
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(sup.waits) == waits


def test_run_backs_off_while_the_gateway_is_unreachable_and_resets_after_success(logged: Lines) -> None:
    async def go() -> None:
        client = FakeClient()
        client.on(REGISTER, UNREACHABLE, UNREACHABLE, UNREACHABLE, UNREACHABLE, REGISTERED)
        client.on(HEARTBEAT, Reply.json(200, {}), UNREACHABLE, UNREACHABLE, Reply.json(200, {}))
        sup = StubSupervisor("chat")
        r = registrar(client, sup, config(interval_s=2.0))
        await run_until(r, sup, 10)
        # Doubling from 0.5 s, capped at the heartbeat interval; the interval after a success;
        # and after the next outage the back-off starts over from 0.5 s.
        assert sup.waits == [0.5, 1.0, 2.0, 2.0, 2.0, 2.0, 0.5, 1.0, 2.0, 2.0]
        assert [c.url for c in client.calls] == [REGISTER] * 5 + [HEARTBEAT] * 5
        # One warning per distinct problem, not one per retry; and a line when it is back.
        assert (
            logged.warnings()
            == [f"cannot connect to gateway {GW}: Connection refused; retrying (at least every 2s)"] * 2
        )
        infos = [m for level, m in logged.lines if level == logging.INFO]
        assert infos.count(f"gateway {GW} is reachable again") == 2

    run(go())


def test_run_backs_off_on_refusals_too() -> None:
    async def go() -> None:
        client = FakeClient().on(REGISTER, Reply.json(401, {"error": {"message": "bad key"}}))
        sup = StubSupervisor("chat")
        r = registrar(client, sup, config(interval_s=5.0))
        await run_until(r, sup, 5)
        assert sup.waits == [0.5, 1.0, 2.0, 4.0, 5.0]

    run(go())


def test_run_in_real_time_keeps_trying_and_recovers_within_an_interval() -> None:
    async def go() -> None:
        client = FakeClient()
        client.on(REGISTER, UNREACHABLE, UNREACHABLE, UNREACHABLE, REGISTERED)
        client.on(HEARTBEAT, Reply.json(200, {}))
        sup = StubSupervisor("chat")
        sup.real_time = True
        r = registrar(client, sup, config(interval_s=0.05))
        task = asyncio.get_running_loop().create_task(r.run())
        try:
            for _ in range(2000):
                if sum(c.url == HEARTBEAT for c in client.calls) >= 3:
                    break
                await asyncio.sleep(0.005)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        urls = [c.url for c in client.calls]
        assert urls[:4] == [REGISTER] * 4 and urls.count(HEARTBEAT) >= 3
        assert max(sup.waits) == 0.05  # never waits longer than the interval

    run(go())
