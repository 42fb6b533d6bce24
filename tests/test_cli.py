"""``rolemesh-gateway``: validate explains; serve refuses unsafe binds."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from rolemesh_gateway import cli
from tests.conftest import ROOT, wait_until
from tests.fakes import FakeUpstream, free_port

OPEN = "version: 1\ndefault_model: p\nmodels:\n  p: {type: proxy, proxy_url: 'http://127.0.0.1:9'}\n"


def test_validate_ok_and_bad(tmp_path: Path, capsys: object) -> None:
    assert cli.main(["validate", str(ROOT / "configs" / "models.yaml")]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(OPEN.replace("proxy_url", "prox_url"))
    assert cli.main(["validate", str(bad)]) == 2


def test_refuses_public_bind_without_client_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "open.yaml"
    cfg.write_text(OPEN)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "rolemesh_gateway.cli",
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
        [sys.executable, "-m", "rolemesh_gateway.cli", "serve", "--config", str(cfg), "--port", str(port)],
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
        [sys.executable, "-m", "rolemesh_gateway.cli", *argv],
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
