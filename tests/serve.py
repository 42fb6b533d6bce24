"""The in-process layer: our ASGI apps served by uvicorn in this process, on 127.0.0.1:0.

Like uvicorn's own ``run_server`` test helper, but in a thread with its own event loop, so that
the (synchronous) tests talk to it over real HTTP exactly as to a subprocess, at a fraction of
the start-up cost, and coverage sees every line. Subprocesses stay for what only a process
shows: the guide's commands, signals, orphans, partitions, the real llama-server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml

from rolemesh_gateway.common.server import guarded_protocol
from rolemesh_gateway.gateway.app import create_app
from rolemesh_gateway.gateway.settings import parse_settings

CLIENT_KEY = "test-client-key"


#: The loggers whose lines ``log_text`` holds: ours, and uvicorn's errors about the app.
CAPTURED = ("rolemesh", "uvicorn.error")


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


class InProcessServer:
    """An ASGI app under uvicorn in a background thread; :meth:`stop` ends it cleanly."""

    def __init__(self, app: Any, port: int = 0, http: Any = "auto") -> None:
        self.app = app
        self.port = port
        self.http = http  # uvicorn's ``http=``: a protocol class, as the programs' CLIs pass
        self._thread: threading.Thread | None = None
        self._server: uvicorn.Server | None = None
        self._capture = _Capture()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> InProcessServer:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            lifespan="on",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=5,
            http=self.http,
        )
        server = self._server = uvicorn.Server(config)
        for name in CAPTURED:
            logging.getLogger(name).addHandler(self._capture)

        def run() -> None:
            with asyncio.Runner() as runner:
                self._loop = runner.get_loop()
                runner.run(server.serve(sockets=[sock]))

        self._thread = threading.Thread(target=run, name=f"uvicorn-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise AssertionError(f"in-process server on {self.url} did not start: {self.log_text()}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(15)
            if self._thread.is_alive():
                import io

                buf = io.StringIO()
                for task in asyncio.all_tasks(self._loop):
                    task.print_stack(file=buf)
                stack = buf.getvalue()
                raise AssertionError(f"in-process server did not stop; its thread is at:\n{stack}")
        self._server = self._thread = None
        for name in CAPTURED:
            logging.getLogger(name).removeHandler(self._capture)

    def log_text(self) -> str:
        return "\n".join(self._capture.lines)


class InProcessGateway(InProcessServer):
    """The gateway app built from a config dict, with the interface of ``GatewayProcess``."""

    def __init__(
        self, config: dict[str, Any] | str, env: Mapping[str, str] | None = None, port: int | None = None
    ) -> None:
        data = yaml.safe_load(config) if isinstance(config, str) else config
        self.settings = parse_settings(data, source="test config", env={**os.environ, **(env or {})})
        super().__init__(None, port or 0, http=guarded_protocol(self.settings.limits))

    def start(self, wait: bool = True) -> InProcessGateway:
        self.app = create_app(self.settings)  # a fresh app each start: a restart forgets nodes
        super().start()
        return self

    def client(self, key: str | None = CLIENT_KEY) -> httpx.Client:
        headers = {"X-Api-Key": key} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)

    @property
    def config_path(self) -> Path:
        raise AssertionError("an in-process gateway has no config file; use gateway(..., process=True)")
