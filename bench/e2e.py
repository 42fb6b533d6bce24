"""End to end with the real llama-server and the tiny model: direct vs gateway + node agent."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from .targets import REPO

NEEDS = ("scripts/llama_server.sh", "scripts/make_tiny_model.py")


def missing() -> str:
    """Why the case cannot run yet ('' when it can)."""
    gone = [p for p in NEEDS if not (REPO / p).exists()]
    agent = Path(sys.executable).parent / "rolemesh-node-agent"
    if not agent.exists() and shutil.which("rolemesh-node-agent") is None:
        gone.append("the rolemesh-node-agent command")
    if gone:
        return "skipped: not in the repo yet: " + ", ".join(gone)
    return ""


def run(work: Path, python: str, quick: bool, say: Callable[[str], None]) -> dict[str, object]:
    raise NotImplementedError("end-to-end case not written yet")
