"""Logging set-up shared by both programs: one line per event, to stderr."""

from __future__ import annotations

import logging
import os

#: The level names both CLIs accept (``--log-level``) and ``ROLE_MESH_LOG_LEVEL`` may hold.
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
LOG_LEVEL_ENV = "ROLE_MESH_LOG_LEVEL"


def setup_logging(level: str | None = None) -> None:
    """Configure the ``rolemesh`` loggers once: ``level``, else ``ROLE_MESH_LOG_LEVEL``, else info.

    The CLIs refuse a bad ``--log-level``; under the guide's bare ``uvicorn`` command only the
    environment variable sets it, and a bad value there is reported and replaced by ``info``
    rather than stopping the gateway.
    """
    logger = logging.getLogger("rolemesh")
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    wanted = (level or os.environ.get(LOG_LEVEL_ENV) or "info").lower()
    logger.setLevel(wanted.upper() if wanted in LOG_LEVELS else "INFO")
    if wanted not in LOG_LEVELS:
        logger.warning(
            "%s=%r is not a log level (%s); using info", LOG_LEVEL_ENV, wanted, ", ".join(LOG_LEVELS)
        )
