"""Owned background tasks: named, stopped in reverse order, failures logged and never fatal."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator

import pytest

from rolemesh_gateway.common.tasks import TaskOwner
from tests.fakeclient import run


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int = logging.DEBUG) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]


@pytest.fixture
def logged() -> Iterator[Records]:
    # Our own handler on the module's logger: whether "rolemesh" propagates does not matter.
    logger = logging.getLogger("rolemesh.tasks")
    handler = Records()
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


async def forever() -> None:
    await asyncio.Event().wait()


async def until(check: Callable[[], bool], what: str) -> None:
    for _ in range(5000):
        if check():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"never happened: {what}")


def test_tasks_are_named_and_all_stopped() -> None:
    async def go() -> None:
        owner = TaskOwner()
        a = owner.start("probe-upstreams", forever())
        b = owner.start("evict-stale-nodes", forever())
        assert (a.get_name(), b.get_name()) == ("probe-upstreams", "evict-stale-nodes")
        assert {t.get_name() for t in asyncio.all_tasks()} >= {"probe-upstreams", "evict-stale-nodes"}
        await owner.stop()
        assert a.cancelled() and b.cancelled()

    run(go())


def test_stop_cancels_in_reverse_order_of_start() -> None:
    async def go() -> None:
        owner = TaskOwner()
        stopped: list[str] = []

        async def task(name: str) -> None:
            try:
                await forever()
            finally:
                stopped.append(name)

        for name in ("registry", "probes", "sweeper"):
            owner.start(name, task(name))
        await asyncio.sleep(0)
        await owner.stop()
        assert stopped == ["sweeper", "probes", "registry"]

    run(go())


def test_stop_waits_for_each_task_to_finish_its_cleanup() -> None:
    async def go() -> None:
        owner = TaskOwner()
        cleaned = []

        async def task() -> None:
            try:
                await forever()
            except asyncio.CancelledError:
                await asyncio.sleep(0.01)  # e.g. deregistering, or a child process exiting
                cleaned.append(True)
                raise

        owner.start("slow-cleanup", task())
        await asyncio.sleep(0)
        await owner.stop()
        assert cleaned == [True]

    run(go())


def test_a_crashing_task_is_logged_not_fatal(logged: Records) -> None:
    async def go() -> None:
        owner = TaskOwner()

        async def crash() -> None:
            raise ValueError("disk on fire")

        survivor = owner.start("survivor", forever())
        crashed = owner.start("crasher", crash())
        await until(crashed.done, "the crash")
        await asyncio.sleep(0)  # the done callback runs
        assert not survivor.done()
        assert "background task crasher died" in logged.messages(logging.ERROR)
        (record,) = [r for r in logged.records if r.levelno >= logging.ERROR]
        assert record.exc_info is not None and "disk on fire" in str(record.exc_info[1])
        await owner.stop()  # does not raise the crash again
        assert survivor.cancelled()

    run(go())


def test_every_keeps_running_after_an_exception(logged: Records) -> None:
    async def go() -> None:
        owner = TaskOwner()
        calls = 0

        async def tick() -> None:
            nonlocal calls
            calls += 1
            if calls <= 2:
                raise RuntimeError(f"flaky {calls}")

        task = owner.every("probe", 0.001, tick)
        await until(lambda: calls >= 5, "five runs")
        assert not task.done()
        failures = [m for m in logged.messages(logging.ERROR) if m.startswith("periodic task probe failed")]
        assert len(failures) == 2
        await owner.stop()
        seen = calls
        await asyncio.sleep(0.01)
        assert calls == seen  # stopped means stopped

    run(go())


def test_stopper_cancelled_while_stopping_raises_cancelled_error() -> None:
    async def go() -> None:
        owner = TaskOwner()
        release = asyncio.Event()

        async def slow_to_stop() -> None:
            try:
                await forever()
            except asyncio.CancelledError:
                await release.wait()  # a cleanup that takes a while
                raise

        owner.start("slow", slow_to_stop())
        await asyncio.sleep(0)
        stopper = asyncio.get_running_loop().create_task(owner.stop())
        await asyncio.sleep(0.01)
        stopper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopper

    run(go())


def test_a_timeout_around_stop_still_fires() -> None:
    # What a bounded shutdown relies on: asyncio.timeout() cancels stop() and says so.
    async def go() -> None:
        owner = TaskOwner()

        async def ignores_cancel() -> None:
            try:
                await forever()
            except asyncio.CancelledError:
                await forever()  # never finishes its cleanup

        owner.start("stubborn", ignores_cancel())
        await asyncio.sleep(0)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await owner.stop()

    run(go())


def test_stop_twice_is_harmless() -> None:
    async def go() -> None:
        owner = TaskOwner()
        x = owner.start("x", forever())
        await owner.stop()
        await owner.stop()
        assert x.cancelled()

    run(go())


def test_a_periodic_call_that_swallows_cancellation_still_stops() -> None:
    """redis-py turns a cancel mid-call into its own error; the loop must still end."""

    async def swallows() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise RuntimeError("connection lost") from None

    async def go() -> None:
        owner = TaskOwner()
        task = owner.every("sync", 0.01, swallows)
        await asyncio.sleep(0.05)
        async with asyncio.timeout(5):
            await owner.stop()
        assert task.cancelled()

    run(go())
