"""Logging set-up shared by both programs: one line per event, to stderr, as text or JSON.

Every line logged while a request is being served carries that request's fields (request id,
client key name, alias, node) through a context variable, so a line from deep in the relay
can be tied to its request. ``ROLE_MESH_LOG_FORMAT=json`` (``--log-format json``) makes each
line one JSON object: time, level, logger, message, and the request's fields when there is one.
"""

from __future__ import annotations

import contextvars
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import orjson

#: The level names both CLIs accept (``--log-level``) and ``ROLE_MESH_LOG_LEVEL`` may hold.
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
LOG_LEVEL_ENV = "ROLE_MESH_LOG_LEVEL"
LOG_FORMATS = ("text", "json")
LOG_FORMAT_ENV = "ROLE_MESH_LOG_FORMAT"


@dataclass(slots=True)
class RequestLog:
    """What the log knows about the request being served (filled in as it is learned)."""

    request_id: str
    client: str | None = None
    alias: str | None = None
    node: str | None = None


#: The request the current task serves, if any.
current_request: contextvars.ContextVar[RequestLog | None] = contextvars.ContextVar(
    "rolemesh_request", default=None
)
_FIELDS = ("request_id", "client", "alias", "node")


class _RequestFields(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        req = current_request.get()
        if req is not None:
            for name in _FIELDS:
                if not hasattr(record, name):
                    setattr(record, name, getattr(req, name))
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} [request {rid}]" if rid else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line; request fields and ``extra=`` fields ride along."""

    _SKIP = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._SKIP and value is not None:
                data[key] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(data, default=str).decode()


def setup_logging(level: str | None = None, fmt: str | None = None) -> None:
    """Configure the ``rolemesh`` loggers once: ``level``, else ``ROLE_MESH_LOG_LEVEL``, else info.

    The CLIs refuse a bad ``--log-level``; under the guide's bare ``uvicorn`` command only the
    environment variables set it, and a bad value there is reported and replaced by ``info``
    rather than stopping the gateway.
    """
    logger = logging.getLogger("rolemesh")
    if logger.handlers:
        return
    wanted_fmt = (fmt or os.environ.get(LOG_FORMAT_ENV) or "text").lower()
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if wanted_fmt == "json" else TextFormatter())
    handler.addFilter(_RequestFields())
    logger.addHandler(handler)
    logger.propagate = False
    wanted = (level or os.environ.get(LOG_LEVEL_ENV) or "info").lower()
    logger.setLevel(wanted.upper() if wanted in LOG_LEVELS else "INFO")
    if wanted not in LOG_LEVELS:
        logger.warning(
            "%s=%r is not a log level (%s); using info", LOG_LEVEL_ENV, wanted, ", ".join(LOG_LEVELS)
        )
    if wanted_fmt not in LOG_FORMATS:
        logger.warning("%s=%r is not a log format (text, json); using text", LOG_FORMAT_ENV, wanted_fmt)
