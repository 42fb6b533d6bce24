"""Owned background tasks: every loop is started, named and stopped through :class:`TaskOwner`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger("rolemesh.tasks")


class TaskOwner:
    """Starts named tasks, keeps them, and cancels and awaits them in reverse order on stop."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[Any]] = []

    def start(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        task.add_done_callback(self._report)
        self._tasks = [t for t in self._tasks if not t.done()]  # short-lived ones (loads) go
        self._tasks.append(task)
        return task

    def every(self, name: str, interval_s: float, fn: Callable[[], Awaitable[object]]) -> asyncio.Task[Any]:
        """Run ``fn`` every ``interval_s`` seconds until stopped; errors are logged, not fatal."""
        return self.start(name, _every(name, interval_s, fn))

    @staticmethod
    def _report(task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s died", task.get_name(), exc_info=task.exception())

    async def stop(self) -> None:
        """Cancel every task, newest first, and wait for each; our own cancellation goes on."""
        tasks, self._tasks = self._tasks[::-1], []
        for task in tasks:
            task.cancel()
        me = asyncio.current_task()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                # The task's own cancellation is expected; ours (a timeout around stop(), a
                # second Ctrl-C) must reach our caller.
                if me is not None and me.cancelling():
                    raise
            except Exception:  # already reported by _report
                pass


async def _every(name: str, interval_s: float, fn: Callable[[], Awaitable[object]]) -> None:
    me = asyncio.current_task()
    while True:
        try:
            await fn()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("periodic task %s failed; retrying in %.1fs", name, interval_s)
        # A library that turns our cancellation into its own error (redis-py does, mid-call)
        # must not keep the loop alive: stop() would wait for it forever.
        if me is not None and me.cancelling():
            raise asyncio.CancelledError
        await asyncio.sleep(interval_s)


def on_signal(sig: int, callback: Callable[[], object] | None) -> None:
    """Call ``callback`` on the running loop when ``sig`` arrives (None: stop). A no-op off the
    main thread (an in-process test server), where signals cannot be handled."""
    loop = asyncio.get_running_loop()
    try:
        if callback is not None:
            loop.add_signal_handler(sig, callback)
        else:
            loop.remove_signal_handler(sig)
    except (NotImplementedError, RuntimeError, ValueError):
        pass
