"""``rolemesh-node-agent``: validate explains; options, env vars and the bind check."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from rolemesh_gateway.agent import cli
from tests.cli_helpers import listening_port


def test_validate_command(fake_files: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    good = Path(fake_files["dir"]) / "good.yaml"
    good.write_text(
        "node_id: n1\ngateway_url: http://127.0.0.1:8000\nroles:\n"
        f"  planner: {{llama_server: {{model: m.gguf, binary: {fake_files['binary']}}}}}\n"
        "  coder: {url: 'http://127.0.0.1:8013'}\n"
    )
    assert cli.main(["validate", str(good)]) == 0
    out = capsys.readouterr().out
    assert "OK, node n1, 2 roles, listens on 127.0.0.1:8091" in out
    assert f"planner: llama-server {fake_files['binary']} -m {fake_files['model']}" in out
    assert "warning: no node_key" in out
    bad = Path(fake_files["dir"]) / "bad.yaml"
    bad.write_text("node_id: n1\ngateway_url: http://x\nroles: {p: {urll: 'http://a'}}\n")
    assert cli.main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"rolemesh-node-agent: config error: {bad}: roles.p.urll: unknown key; "
        "allowed here: llama_server, proxy_url, upstream_model, health_path, api_key"
    )


def test_config_given_before_validate_and_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(URL_ROLE)
    assert cli.main(["--config", str(cfg), "validate"]) == 0
    assert "OK, node n1, 1 roles" in capsys.readouterr().out
    monkeypatch.setenv("ROLE_MESH_AGENT_CONFIG", str(cfg))
    assert cli.main(["validate"]) == 0
    monkeypatch.delenv("ROLE_MESH_AGENT_CONFIG")
    assert cli.main(["validate"]) == 2
    assert (
        "no config file: pass --config agent.yaml (or set ROLE_MESH_AGENT_CONFIG)" in capsys.readouterr().err
    )


def test_log_level_takes_only_valid_levels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(URL_ROLE)
    assert cli.main(["--log-level", "loud", "--config", str(cfg), "validate"]) == 2
    err = capsys.readouterr().err
    assert "Invalid value for '--log-level'" in err and "Traceback" not in err


def test_help_shows_defaults_and_environment_variables(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("default: 10", "ROLE_MESH_AGENT_CONFIG", "ROLE_MESH_AGENT_PORT", "ROLE_MESH_LOG_LEVEL"):
        assert text in out
    for text in (
        "--tls-cert-file",
        "ROLE_MESH_AGENT_TLS_CERT_FILE",
        "--tls-client-ca-file",
        "--tls-ca-file",
        "--tls-client-key-file",
    ):
        assert text in out
    assert cli.main(["--version"]) == 0
    assert re.fullmatch(r"rolemesh-node-agent \d+\.\d+\.\d+\n", capsys.readouterr().out)


URL_ROLE = "node_id: n1\ngateway_url: http://127.0.0.1:9\nroles: {p: {proxy_url: 'http://127.0.0.1:9'}}\n"


def test_port_zero_means_a_free_port(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(URL_ROLE)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rolemesh_gateway.agent.cli", "--port", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "ROLE_MESH_AGENT_CONFIG": str(cfg)},
    )
    try:
        port = listening_port(proc)
        assert port not in (0, 8091)
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["node_id"] == "n1"
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


def test_mutual_tls_protects_a_lan_bind_as_a_node_key_does(tmp_path: Path) -> None:
    """No node_key, but every caller must show a certificate of our CA: a LAN bind is allowed."""
    certs = tmp_path / "certs"
    make = Path(__file__).resolve().parent.parent / "scripts" / "make_certs.sh"
    subprocess.run([str(make), "-o", str(certs), "n1"], check=True, capture_output=True)
    cfg = tmp_path / "agent.yaml"
    base = URL_ROLE + "host: 0.0.0.0\nadvertise_url: https://10.0.0.12:8091\nport: 0\n"
    cfg.write_text(base)
    refused = subprocess.run(
        [sys.executable, "-m", "rolemesh_gateway.agent.cli", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 2 and "refusing to listen on 0.0.0.0 without node_key" in refused.stderr
    tls = f"tls: {{cert_file: {certs}/n1.crt, key_file: {certs}/n1.key, client_ca_file: {certs}/ca.crt}}\n"
    cfg.write_text(base + tls)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rolemesh_gateway.agent.cli", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 20
        line = ""
        while "listening on" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
        assert "rolemesh-node-agent listening on https://0.0.0.0:" in line
    finally:
        proc.terminate()
        proc.wait(20)
        if proc.stderr is not None:
            proc.stderr.close()
