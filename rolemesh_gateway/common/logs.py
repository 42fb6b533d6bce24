"""Logging set-up shared by both programs: one line per event, to stderr."""

from __future__ import annotations

import logging
import os


def setup_logging(level: str | None = None) -> None:
    """Configure the ``rolemesh`` loggers once (``ROLE_MESH_LOG_LEVEL``, default INFO)."""
    logger = logging.getLogger("rolemesh")
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel((level or os.environ.get("ROLE_MESH_LOG_LEVEL", "INFO")).upper())
    logger.propagate = False
