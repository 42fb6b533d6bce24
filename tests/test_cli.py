"""``rolemesh-gateway``: validate explains; serve refuses unsafe binds; options and env vars."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from rolemesh_gateway.gateway import cli
from tests.cli_helpers import listening_port
from tests.conftest import ROOT, wait_until
from tests.fakes import FakeUpstream, free_port

OPEN = "version: 1\ndefault_model: p\nmodels:\n  p: {type: proxy, proxy_url: 'http://127.0.0.1:9'}\n"


def test_validate_ok_and_bad(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    guide = ROOT / "configs" / "models.yaml"
    assert cli.main(["validate", str(guide)]) == 0
    out = capsys.readouterr().out
    assert f"{guide}: OK, 2 aliases, default_model=planner" in out
    assert "planner (planner): proxy http://127.0.0.1:8011" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(OPEN.replace("proxy_url", "prox_url"))
    assert cli.main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"rolemesh-gateway: config error: {bad}: models.p.prox_url: unknown key; allowed here: "
        "type, openai_model_name, proxy_url, upstream_model, health_path, api_key, timeouts, fallbacks"
    )


def test_config_given_before_validate_is_the_one_validated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``rolemesh-gateway --config F validate`` used to ignore F and ask for ROLE_MESH_CONFIG."""
    monkeypatch.delenv("ROLE_MESH_CONFIG", raising=False)
    good = tmp_path / "good.yaml"
    good.write_text(OPEN)
    assert cli.main(["--config", str(good), "validate"]) == 0
    assert f"{good}: OK, 1 aliases" in capsys.readouterr().out
    monkeypatch.setenv("ROLE_MESH_CONFIG", str(good))
    assert cli.main(["validate"]) == 0  # and from the environment


def test_a_key_that_cannot_be_sent_in_a_header_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A non-ASCII key used to pass validate and then crash the gateway at start."""
    cfg = tmp_path / "keys.yaml"
    cfg.write_text(OPEN + "auth:\n  node_api_keys: ['ключ']\n", encoding="utf-8")
    assert cli.main(["validate", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "auth.node_api_keys.0: 'ключ' must be printable ASCII" in err


def test_log_level_takes_only_valid_levels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--log-level foo`` used to end in a ValueError traceback."""
    assert cli.main(["--log-level", "foo", "validate", str(ROOT / "configs" / "models.yaml")]) == 2
    err = capsys.readouterr().err
    assert "Invalid value for '--log-level'" in err and "Traceback" not in err


def test_help_shows_defaults_and_environment_variables(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("default: 8080", "default: 127.0.0.1", "default: 30", "ROLE_MESH_CONFIG", "ROLE_MESH_PORT"):
        assert text in out
    for text in (
        "--tls-cert-file",
        "ROLE_MESH_TLS_CERT_FILE",
        "--tls-client-ca-file",
        "--tls-ca-file",
        "--tls-client-key-file",
    ):
        assert text in out
    assert cli.main(["--version"]) == 0
    assert re.fullmatch(r"rolemesh-gateway \d+\.\d+\.\d+\n", capsys.readouterr().out)


def _serve(tmp_path: Path, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    cfg = tmp_path / "open.yaml"
    cfg.write_text(OPEN)
    return subprocess.Popen(
        [sys.executable, "-m", "rolemesh_gateway.gateway.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "ROLE_MESH_CONFIG": str(cfg), **(env or {})},
    )


@pytest.mark.parametrize("how", ["flag", "env"])
def test_port_zero_means_a_free_port(tmp_path: Path, how: str) -> None:
    """``--port 0`` (or ROLE_MESH_PORT=0) used to bind 8080."""
    proc = _serve(tmp_path, "--port", "0") if how == "flag" else _serve(tmp_path, env={"ROLE_MESH_PORT": "0"})
    try:
        port = listening_port(proc)
        assert port not in (0, 8080)
        assert httpx.get(f"http://127.0.0.1:{port}/health").json() == {"status": "ok"}
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_a_busy_port_fails_at_once_with_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = _serve(tmp_path, "--port", str(busy.getsockname()[1]))
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert "address already in use" in err.lower()


def test_refuses_public_bind_without_client_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "open.yaml"
    cfg.write_text(OPEN)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "rolemesh_gateway.gateway.cli",
            "--config",
            str(cfg),
            "--host",
            "0.0.0.0",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "refusing to listen on 0.0.0.0 without auth.client_api_keys" in out.stderr


def test_serve_defaults_to_loopback_and_runs(tmp_path: Path) -> None:
    cfg = tmp_path / "open.yaml"
    cfg.write_text(OPEN)
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rolemesh_gateway.gateway.cli",
            "serve",
            "--config",
            str(cfg),
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200, 20, "cli gateway")
        # No keys configured: open, with a loud warning; /ready reports the dead upstream.
        assert httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 503
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert b"NO API KEYS CONFIGURED" in err


def _cli_gateway(tmp_path: Path, upstream: str, graceful_s: int) -> tuple[subprocess.Popen[bytes], str]:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(OPEN.replace("http://127.0.0.1:9", upstream))
    port = free_port()
    argv = ["--config", str(cfg), "--port", str(port), "--graceful-timeout", str(graceful_s)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rolemesh_gateway.gateway.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/health").status_code == 200, 20, "cli gateway")
    return proc, url


def _stream_and_terminate(url: str, proc: subprocess.Popen[bytes]) -> tuple[list[str], float]:
    """Stream a completion; SIGTERM the gateway after two events. Returns events and when."""
    lines: list[str] = []
    stopped = 0.0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={"stream": True}) as r:
        try:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) == 2 and not stopped:
                    proc.terminate()
                    stopped = time.monotonic()
        except httpx.HTTPError:
            pass  # cut off by the shutdown bound
    return lines, stopped


def test_sigterm_lets_streams_finish_then_exits(tmp_path: Path) -> None:
    up = FakeUpstream("writer", chunks=10, chunk_interval_s=0.15).start()
    try:
        proc, url = _cli_gateway(tmp_path, up.url, 5)
        lines, _ = _stream_and_terminate(url, proc)
        assert lines[-1] == "data: [DONE]" and len(lines) == 12
        # uvicorn re-raises the signal after a clean shutdown, so "killed by SIGTERM" is success.
        assert proc.wait(10) in (0, -signal.SIGTERM)
    finally:
        up.stop()


def test_graceful_timeout_bounds_the_wait_for_streams(tmp_path: Path) -> None:
    up = FakeUpstream("writer", chunks=40, chunk_interval_s=0.2).start()  # an 8 s stream
    try:
        proc, url = _cli_gateway(tmp_path, up.url, 1)
        lines, stopped = _stream_and_terminate(url, proc)
        proc.wait(10)
        assert time.monotonic() - stopped < 4  # the 1 s bound, not the 8 s stream
        assert "data: [DONE]" not in lines
    finally:
        up.stop()


def test_validate_shows_fallback_chains_and_refuses_a_cycle_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        "version: 1\ndefault_model: planner\nmodels:\n"
        "  planner: {type: discovered, role: planner, fallbacks: [writer]}\n"
        "  writer: {type: discovered, role: writer, fallbacks: [big]}\n"
        "  big: {type: proxy, proxy_url: 'http://127.0.0.1:9'}\n"
    )
    assert cli.main(["validate", str(good)]) == 0
    assert "planner (planner): discovered role=planner" in (out := capsys.readouterr().out)
    assert "; fallbacks: writer -> big" in out
    bad = tmp_path / "cycle.yaml"
    bad.write_text(good.read_text().replace("fallbacks: [big]", "fallbacks: [planner]"))
    assert cli.main(["validate", str(bad)]) == 2
    assert capsys.readouterr().err == (
        f"rolemesh-gateway: config error: {bad}: "
        "models.planner.fallbacks: cycle planner -> writer -> planner\n"
    )
