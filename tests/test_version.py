"""The version lives in one place and every entry point shows the same one."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import rolemesh_gateway
from rolemesh_gateway.common.version import __version__

ROOT = Path(__file__).resolve().parent.parent


def test_one_version_everywhere() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)
    assert rolemesh_gateway.__version__ == __version__
    assert version("rolemesh-gateway") == __version__  # pyproject reads it from common/version.py
    assert 'version = "' not in (ROOT / "pyproject.toml").read_text().split("[project.optional")[0]


def test_both_programs_print_it() -> None:
    for module in ("rolemesh_gateway.gateway.cli", "rolemesh_gateway.agent.cli"):
        out = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip().endswith(f" {__version__}"), out
