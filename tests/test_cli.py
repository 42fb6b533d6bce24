"""``rolemesh-gateway``: validate explains; serve refuses unsafe binds."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx

from rolemesh_gateway import cli
from tests.conftest import ROOT, wait_until
from tests.fakes import free_port

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


def test_sigterm_lets_streams_finish_then_exits(tmp_path: Path) -> None:
    from tests.fakes import FakeUpstream

    up = FakeUpstream("writer", chunks=10, chunk_interval_s=0.15).start()
    try:
        cfg = tmp_path / "gw.yaml"
        cfg.write_text(OPEN.replace("http://127.0.0.1:9", up.url))
        port = free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rolemesh_gateway.cli",
                "--config",
                str(cfg),
                "--port",
                str(port),
                "--graceful-timeout",
                "5",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 200, 20, "cli gateway")
        lines = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={"stream": True}) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) == 2:
                    proc.terminate()
        assert lines[-1] == "data: [DONE]" and len(lines) == 12
        # uvicorn re-raises the signal after a clean shutdown, so "killed by SIGTERM" is success.
        assert proc.wait(10) in (0, -signal.SIGTERM)
    finally:
        up.stop()
