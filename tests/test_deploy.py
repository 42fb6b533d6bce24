"""Deployment files: the systemd units (``systemd-analyze verify`` and its offline security
review), the release check (sdist and wheel built, installed and run), deploy/compose.yaml, the
example configs of deploy/ and the Dockerfile's promises.

The container test (``scripts/container_test.sh``: podman builds and runs the images, and the
units under a real systemd) takes minutes and runs from .ci/run, not from here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rolemesh_gateway import ConfigError, load_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNITS = ("rolemesh-gateway.service", "rolemesh-node-agent.service")
EXEC_KEYS = ("ExecStartPre", "ExecStart", "ExecStartPost", "ExecReload", "ExecStop", "ExecStopPost")
#: Where the host keeps systemd's own units (sysinit.target, ...), which verify needs in the root.
HOST_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))


def directives(unit: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file (keys may repeat), comments and sections left out."""
    out: dict[str, list[str]] = {}
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def exec_paths(unit: Path) -> list[str]:
    """The programs a unit runs (ExecStart= and friends), without systemd's prefixes."""
    found = []
    for key in EXEC_KEYS:
        for value in directives(unit).get(key, []):
            found.append(value.lstrip("-@:+!").split()[0])
    return found


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    """systemd-analyze, installed with apt-get (as CI does) when missing; skipped only if it can't be."""
    found = shutil.which("systemd-analyze")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        pytest.skip(
            "systemd-analyze is missing and cannot be installed here: "
            + ("no apt-get" if apt is None else "apt-get needs root")
            + " (apt-get install systemd)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in ([apt, "update", "-qq"], [apt, "install", "-y", "-qq", "--no-install-recommends", "systemd"]):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
        if out.returncode != 0:
            pytest.skip(f"systemd-analyze is missing and `{' '.join(cmd[1:3])}` failed: {out.stderr[-400:]}")
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is missing even after apt-get install systemd")
    return found


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    """A root for ``--root``: systemd's own units from the host, deploy/'s units unchanged in
    /etc/systemd/system, and an executable stand-in at every path their Exec*= lines name (this
    machine has no /opt/rolemesh/venv; verify checks those paths exist and are executable)."""
    host_units = next((d for d in HOST_UNIT_DIRS if (d / "sysinit.target").exists()), None)
    if host_units is None:
        pytest.fail(
            f"systemd is installed but none of {[str(d) for d in HOST_UNIT_DIRS]} holds sysinit.target"
        )
    root = tmp_path / "root"
    shutil.copytree(host_units, root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    etc = root / "etc" / "systemd" / "system"
    etc.mkdir(parents=True)
    for name in UNITS:
        shutil.copy2(DEPLOY / name, etc / name)
        for exe in exec_paths(DEPLOY / name):
            assert exe.startswith("/"), f"{name}: {exe} is not an absolute path"
            stub = root / exe.lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\nexit 0\n")
            stub.chmod(0o755)
    return root


def analyze(tool: str, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool, *args[:1], f"--root={root}", *args[1:]],
        cwd=root.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_units_pass_systemd_analyze_verify(systemd_analyze: str, fake_root: Path) -> None:
    out = analyze(systemd_analyze, fake_root, "verify", *UNITS)
    # verify exits 0 on mere warnings (an unknown key, a bad value): any output at all fails here
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr


def test_verify_sees_a_missing_program(systemd_analyze: str, fake_root: Path) -> None:
    """The check above is real: without the program ExecStart names, verify fails."""
    exe = exec_paths(DEPLOY / UNITS[0])[0]
    (fake_root / exe.lstrip("/")).unlink()
    out = analyze(systemd_analyze, fake_root, "verify", UNITS[0])
    assert out.returncode != 0
    assert exe in out.stdout + out.stderr


@pytest.mark.parametrize(
    ("unit", "most"), [("rolemesh-gateway.service", 2.0), ("rolemesh-node-agent.service", 2.5)]
)
def test_units_security_exposure(systemd_analyze: str, fake_root: Path, unit: str, most: float) -> None:
    out = analyze(systemd_analyze, fake_root, "security", "--offline=yes", unit)
    level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout)
    assert level, out.stdout[-2000:] + out.stderr
    assert float(level.group(1)) <= most, out.stdout


@pytest.mark.parametrize("name", UNITS)
def test_units_keep_the_promised_settings(name: str) -> None:
    d = directives(DEPLOY / name)
    for key, value in {
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "User": "rolemesh",
        "EnvironmentFile": "/etc/rolemesh/rolemesh.env",
    }.items():
        assert d.get(key) == [value], f"{name}: {key}={d.get(key)}, expected {value}"
    (start,) = d["ExecStart"]
    assert start.startswith("/opt/rolemesh/venv/bin/rolemesh-"), start
    assert "--config /etc/rolemesh/" in start, start
    if name == "rolemesh-gateway.service":
        assert "--host 127.0.0.1" in start, "the gateway unit must bind loopback by default"
    else:  # the agent stops its children itself, and before a gateway on the same host
        assert d["KillMode"] == ["mixed"]
        assert "rolemesh-gateway.service" in " ".join(d["After"]).split()


@pytest.mark.timeout(900)
def test_release_check() -> None:
    """scripts/release_check.sh: sdist + wheel, contents, fresh venv, --help/--version, /health."""
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "release_check.sh")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    assert out.returncode == 0, f"release_check.sh failed ({out.returncode}):\n{out.stderr[-4000:]}"
    assert "release check: OK" in out.stdout, out.stdout + out.stderr[-2000:]


def test_compose_runs_the_gateway_on_the_host_network() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    gw = services["gateway"]
    assert gw["network_mode"] == "host"
    assert gw["build"]["target"] == "gateway"
    assert gw["env_file"] == "rolemesh.env"
    assert any(v.endswith(":/etc/rolemesh/models.yaml:ro") for v in gw["volumes"]), gw["volumes"]
    assert gw["command"][gw["command"].index("--host") + 1] == "127.0.0.1"
    assert gw["user"] != "0" and not str(gw["user"]).startswith(("0:", "root"))
    assert gw["read_only"] is True and gw["cap_drop"] == ["ALL"]
    # the agent service is there as a commented-out example only
    assert "agent" not in services
    assert re.search(r"^  # agent:$", (DEPLOY / "compose.yaml").read_text(), re.MULTILINE)
    assert (DEPLOY / "models.yaml").is_file()


def test_env_example_has_the_keys_the_configs_use() -> None:
    env = {}
    for line in (DEPLOY / "rolemesh.env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"not KEY=value: {line!r}"
            assert not value.startswith(("'", '"')), f"quoted value (systemd and compose differ): {line!r}"
            env[key] = value
    used = set()
    for name in ("models.yaml", "node-agent.yaml"):  # what the YAML holds, not its comments
        used |= set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", repr(yaml.safe_load((DEPLOY / name).read_text()))))
    assert used and used <= env.keys(), f"used {sorted(used)}, the example sets {sorted(env)}"


def test_deploy_models_yaml_is_valid_and_fails_closed_without_keys() -> None:
    env = {"ROLE_MESH_CLIENT_KEY": "ck", "ROLE_MESH_NODE_KEY": "nk"}
    settings = load_settings(DEPLOY / "models.yaml", env=env)
    assert settings.auth.client_api_keys and settings.auth.node_api_keys
    with pytest.raises(ConfigError, match="ROLE_MESH_CLIENT_KEY"):
        load_settings(DEPLOY / "models.yaml", env={})


def test_deploy_node_agent_yaml_is_valid(tmp_path: Path) -> None:
    """Checked with ``rolemesh-node-agent validate``, model paths pointed at stand-in files."""
    data = yaml.safe_load((DEPLOY / "node-agent.yaml").read_text())
    assert data["host"] == "127.0.0.1"
    text = (DEPLOY / "node-agent.yaml").read_text()
    for role, spec in data["roles"].items():
        model = spec["llama_server"]["model"]
        (tmp_path / f"{role}.gguf").write_bytes(b"GGUF")
        text = text.replace(model, str(tmp_path / f"{role}.gguf"))
    cfg = tmp_path / "node-agent.yaml"
    cfg.write_text(text)
    fake_server = tmp_path / "llama-server"
    fake_server.write_text("#!/bin/sh\nexit 0\n")
    fake_server.chmod(0o755)
    prog = Path(sys.executable).parent / "rolemesh-node-agent"
    out = subprocess.run(
        [str(prog) if prog.exists() else "rolemesh-node-agent", "validate", str(cfg)],
        env={**os.environ, "ROLE_MESH_NODE_KEY": "nk", "ROLE_MESH_LLAMA_SERVER": str(fake_server)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def dockerfile_stages() -> tuple[list[str], dict[str, str]]:
    """(lines before the first FROM, {stage name: its text})."""
    text = (ROOT / "Dockerfile").read_text()
    parts = re.split(r"^FROM ", text, flags=re.MULTILINE)
    stages = {}
    for part in parts[1:]:
        header = part.splitlines()[0]
        name = header.split(" AS ")[-1].strip() if " AS " in header else header
        stages[name] = part
    return parts[0].splitlines(), stages


def test_dockerfile_targets_and_defaults() -> None:
    preamble, stages = dockerfile_stages()
    assert "ARG BASE_IMAGE=python:3.11-slim" in preamble
    assert {"base", "build", "runtime", "gateway", "agent", "agent-llama"} <= stages.keys()
    assert "pip wheel" in stages["build"]
    for target in ("gateway", "agent"):
        stage = stages[target]
        assert re.search(r"^USER 10001(:10001)?$", stage, re.MULTILINE), f"{target} must run as uid 10001"
        assert "HEALTHCHECK" in stage and "/health" in stage and "urllib" in stage
    gateway_cmd = (
        'CMD ["rolemesh-gateway", "--config", "/etc/rolemesh/models.yaml", '
        '"--host", "127.0.0.1", "--port", "8080"]'
    )
    assert gateway_cmd in stages["gateway"]
    assert 'CMD ["rolemesh-node-agent", "--config", "/etc/rolemesh/node-agent.yaml"]' in stages["agent"]
    assert "ROLE_MESH_AGENT_CONFIG=/etc/rolemesh/node-agent.yaml" in stages["agent"]
    assert "ROLE_MESH_LLAMA_SERVER=/opt/llama/bin/llama-server" in stages["agent"]
    # the last stage is what a plain `docker build .` gives: the gateway
    assert list(stages)[-1] == "gateway"
