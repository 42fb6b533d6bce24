"""Client limits of ``rolemesh-gateway`` (common/server.py), against the real CLI process.

Audit findings 1 and 2: without them a client with no key could hold connections forever and
lock everyone out, or send an endless request head that costs memory, quadratic CPU and every
other client's latency.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cli_helpers import listening_port
from tests.conftest import CLIENT_KEY
from tests.fakes import FakeUpstream

HEAD_CAP = 16 * 1024


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    up = FakeUpstream("writer").start()
    yield up
    up.stop()


class CliGateway:
    def __init__(
        self, tmp: Path, upstream: FakeUpstream, nofile: int | None = None, **limits: object
    ) -> None:
        cfg = tmp / "gw.yaml"
        extra = "".join(f"  {k}: {v}\n" for k, v in {"max_head_bytes": HEAD_CAP, **limits}.items())
        cfg.write_text(
            "version: 1\ndefault_model: writer\n"
            f"auth: {{client_api_keys: ['{CLIENT_KEY}']}}\n"
            f"models: {{writer: {{type: proxy, proxy_url: '{upstream.url}'}}}}\n"
            f"limits:\n{extra}"
        )
        argv = [sys.executable, "-m", "rolemesh_gateway.gateway.cli", "--config", str(cfg), "--port", "0"]
        if nofile is not None:  # the process's own file descriptor limit, as `ulimit -n` sets it
            argv = ["prlimit", f"--nofile={nofile}:{nofile}", *argv]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ
        )
        self.port = listening_port(self.proc)
        self.url = f"http://127.0.0.1:{self.port}"
        # Keep reading its log so that it never blocks on a full pipe.
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        self.sockets: list[socket.socket] = []

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for _ in self.proc.stderr:
            pass

    def stop(self) -> None:
        for s in self.sockets:
            s.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self.sockets.append(sock)
        return sock


def closed_within(sock: socket.socket, limit_s: float) -> tuple[bool, bytes]:
    """Wait for the server to close: ``(closed, what it sent first)``."""
    sock.settimeout(limit_s)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
        return True, got
    except TimeoutError:
        return False, got
    except ConnectionResetError:
        return True, got


def test_a_connection_that_sends_nothing_is_closed_at_the_head_deadline(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    gw = CliGateway(tmp_path, upstream, head_timeout_s=1)
    try:
        sock = gw.connect()
        started = time.monotonic()
        closed, got = closed_within(sock, 10)
        took = time.monotonic() - started
        assert closed and got == b"" and 0.9 <= took < 5  # relative to the configured 1 s
    finally:
        gw.stop()


def test_a_trickled_head_gets_408_at_the_deadline(tmp_path: Path, upstream: FakeUpstream) -> None:
    gw = CliGateway(tmp_path, upstream, head_timeout_s=1)
    try:
        sock = gw.connect()
        started = time.monotonic()
        request = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
        try:
            for byte in request[:8]:  # one byte every 0.2 s: the deadline is not extended by them
                sock.sendall(bytes([byte]))
                time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed at the deadline, before we were through
        closed, got = closed_within(sock, 10)
        assert closed and got.startswith(b"HTTP/1.1 408 ")
        assert b"limits.head_timeout_s" in got
        assert time.monotonic() - started < 5
    finally:
        gw.stop()


def test_a_keep_alive_connection_gets_a_new_deadline_per_request(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    gw = CliGateway(tmp_path, upstream, head_timeout_s=1, keepalive_s=30)
    try:
        with httpx.Client(base_url=gw.url, headers={"X-Api-Key": CLIENT_KEY}) as client:
            for _ in range(3):  # well-behaved clients are never cut, however long they stay
                assert client.post("/v1/chat/completions", json={}).status_code == 200
                time.sleep(0.5)
    finally:
        gw.stop()


ATTACKER = r"""
import socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
deadline = time.monotonic() + seconds
attacks, worst, answers = 0, 0, set()
while time.monotonic() < deadline and attacks < 20000:  # one 100 MB request head after another
    attacks += 1
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: ")
    sent = 0
    try:
        while sent < 100 * 1024 * 1024:
            s.sendall(b"a" * 65536)
            sent += 65536
    except OSError:
        pass
    try:
        answers.add(s.recv(32)[:12])
    except OSError:
        answers.add(b"reset")
    s.close()
    worst = max(worst, sent)
print(attacks, worst, sorted(answers))
"""


def test_an_oversized_head_is_refused_at_the_cap_and_health_stays_fast(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """A 100 MB header is refused after at most the cap of bytes; /health stays under 50 ms p99."""
    gw = CliGateway(tmp_path, upstream)
    try:
        attacker = subprocess.Popen(
            [sys.executable, "-c", ATTACKER, str(gw.port), "3"], stdout=subprocess.PIPE, text=True
        )
        latencies = []
        with httpx.Client(base_url=gw.url, timeout=5) as c:
            while attacker.poll() is None and len(latencies) < 3000:
                t0 = time.perf_counter()
                assert c.get("/health").status_code == 200
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.002)
        out, _ = attacker.communicate(timeout=30)
    finally:
        gw.stop()
    attacks, worst, answers = out.split(" ", 2)
    assert int(attacks) >= 5
    assert "HTTP/1.1 431" in answers, answers
    # The gateway stopped reading at the cap: what an attacker pushed is the cap plus what the
    # kernels' socket buffers held, nowhere near 100 MB.
    assert int(worst) < 16 * 1024 * 1024, worst
    assert len(latencies) >= 100
    p99 = statistics.quantiles(latencies, n=100)[98]
    assert p99 < 0.05, f"/health p99 {p99 * 1000:.1f} ms while the big heads arrived"


def test_thousands_of_idle_connections_do_not_lock_out_a_client_with_a_key(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """Under ``ulimit -n 1024``, 2,000 idle or trickling connections, and keyed clients are served."""
    gw = CliGateway(tmp_path, upstream, nofile=1024, head_timeout_s=30)
    held = gw.sockets
    try:
        for i in range(2000):
            try:
                s = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
            except OSError:
                continue
            if i % 2:  # half of them trickle the start of a request head
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
            held.append(s)
        served = 0
        with httpx.Client(base_url=gw.url, headers={"X-Api-Key": CLIENT_KEY}, timeout=10) as client:
            for _ in range(20):
                r = client.post("/v1/chat/completions", json={"messages": []})
                served += r.status_code == 200
        assert served == 20
        assert httpx.get(f"{gw.url}/health", timeout=5).status_code == 200
        assert gw.proc.poll() is None  # and the gateway is still there
    finally:
        gw.stop()
