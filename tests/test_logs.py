"""Logging set-up: one line per event on stderr, at the level asked for."""

from __future__ import annotations

import logging
import subprocess
import sys


def _run(code: str, env: dict[str, str] | None = None) -> str:
    import os

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    assert out.returncode == 0, out.stderr
    return out.stderr


CODE = (
    "import logging\n"
    "from rolemesh_gateway.common.logs import setup_logging\n"
    "setup_logging({level})\n"
    "logging.getLogger('rolemesh.x').debug('a debug line')\n"
    "logging.getLogger('rolemesh.x').info('an info line')\n"
)


def test_default_level_is_info_and_lines_name_level_and_logger() -> None:
    err = _run(CODE.format(level="None"), {"ROLE_MESH_LOG_LEVEL": ""})
    assert "INFO rolemesh.x: an info line" in err and "a debug line" not in err


def test_level_from_argument_and_from_the_environment() -> None:
    assert "a debug line" in _run(CODE.format(level="'debug'"))
    assert "a debug line" in _run(CODE.format(level="None"), {"ROLE_MESH_LOG_LEVEL": "debug"})
    assert "an info line" not in _run(CODE.format(level="'warning'"))


def test_setting_up_twice_adds_no_second_handler() -> None:
    from rolemesh_gateway.common.logs import setup_logging

    logger = logging.getLogger("rolemesh")
    before = list(logger.handlers)
    setup_logging("info")
    setup_logging("info")
    assert len(logger.handlers) <= max(1, len(before))


def test_a_bad_level_in_the_environment_is_reported_not_fatal() -> None:
    err = _run(CODE.format(level="None"), {"ROLE_MESH_LOG_LEVEL": "loud"})
    assert "ROLE_MESH_LOG_LEVEL='loud' is not a log level" in err and "an info line" in err
