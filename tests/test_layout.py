"""The layout rule: ``common`` imports only itself, the agent imports only ``common``, and every
module has its test module (the idea of mitmproxy's ``filename_matching.py``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "rolemesh_gateway"
TESTS = ROOT / "tests"


def imported_packages(path: Path, source: str | None = None) -> set[str]:
    """Absolute names of the ``rolemesh_gateway`` modules a source file imports."""
    here = path.relative_to(ROOT).with_suffix("").parts[:-1]  # the package the file is in
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                name = ".".join((*base, node.module)) if node.module else ".".join(base)
            else:
                name = node.module or ""
            found.add(name)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {n for n in found if n.startswith("rolemesh_gateway")}


def modules(sub: str) -> list[Path]:
    return sorted((PACKAGE / sub).rglob("*.py"))


@pytest.mark.parametrize("path", modules("common"), ids=lambda p: p.name)
def test_common_imports_only_common(path: Path) -> None:
    bad = {n for n in imported_packages(path) if not n.startswith("rolemesh_gateway.common")}
    assert not bad, f"{path.name} imports {bad}: common/ must stand on its own"


@pytest.mark.parametrize("path", modules("agent"), ids=lambda p: p.name)
def test_agent_imports_only_common(path: Path) -> None:
    allowed = ("rolemesh_gateway.common", "rolemesh_gateway.agent")
    bad = {n for n in imported_packages(path) if not n.startswith(allowed)}
    assert not bad, f"agent/{path.name} imports {bad}: the agent may use only common/"


def test_http_client_imports_no_settings() -> None:
    imported = imported_packages(PACKAGE / "common" / "http1.py")
    assert imported <= {"rolemesh_gateway.common.errors"}, imported


def test_the_import_walker_sees_a_violation() -> None:
    """The rules above can fail: relative and absolute imports of the gateway are both found."""
    where = PACKAGE / "common" / "example.py"
    source = "from ..gateway.app import Gateway\nfrom . import errors\nimport rolemesh_gateway.agent.cli\n"
    assert imported_packages(where, source) == {
        "rolemesh_gateway.gateway.app",
        "rolemesh_gateway.common",
        "rolemesh_gateway.agent.cli",
    }


def test_importing_the_agent_cli_loads_no_gateway_code() -> None:
    code = (
        "import sys, rolemesh_gateway.agent.cli\n"
        "print('\\n'.join(m for m in sys.modules if m.startswith('rolemesh_gateway')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    loaded = set(out.stdout.split())
    assert "rolemesh_gateway.agent.cli" in loaded
    assert not {m for m in loaded if m.startswith("rolemesh_gateway.gateway")}, loaded
    assert "rolemesh_gateway.main" not in loaded


#: Modules whose behaviour is tested through another module's tests, and why.
EXEMPT = {
    "main.py": "the guide's uvicorn command, run verbatim in test_app.py and test_cli.py",
    "gateway/registry/base.py": "the interface; its freshness rule is tested in test_registry_memory.py",
}


def expected_tests(path: Path) -> list[str]:
    """``test_<name>.py``, or ``test_<parent>_<name>.py`` where names repeat (agent/app.py)."""
    rel = path.relative_to(PACKAGE)
    names = [f"test_{rel.stem}.py"]
    if len(rel.parts) > 1:
        names.append(f"test_{rel.parts[-2]}_{rel.stem}.py")
    return names


@pytest.mark.parametrize(
    "path",
    [p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "__init__.py"],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_every_module_has_a_test_module(path: Path) -> None:
    rel = str(path.relative_to(PACKAGE))
    if rel in EXEMPT:
        return
    names = expected_tests(path)
    assert any((TESTS / n).exists() for n in names), f"{rel} has no test module (expected one of {names})"
