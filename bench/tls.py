"""The hot path with TLS between the client and the gateway, beside the same gateway over plain HTTP.

Two ``rolemesh-gateway`` processes (the program's own server: uvloop, httptools, the guarded
protocol) with the same config in front of the same nginx upstream; one serves HTTPS with a
certificate from ``scripts/make_certs.sh``. wrk posts the non-streaming chat request over
keep-alive connections at 1 and 64 connections, runs interleaved so that a noisy moment hurts
both alike. The cost shown is that of encrypting requests and answers on connections already
open (wrk opens its connections once); a handshake per request is not measured.

Run it with ``bash bench/run.sh --cases tls``.
"""

from __future__ import annotations

import json
import socket
import ssl
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .procs import Proc, free_port
from .targets import CLIENT_KEY, REPO, gateway_config, source_env
from .upstreams import CHAT_REQUEST, start_nginx
from .wrk import WrkResult, run_wrk, write_script

CONNECTIONS = (1, 64)
CHAT_PATH = "/v1/chat/completions"


def _gateway(
    work: Path, python: str, name: str, config: dict[str, object], tls: list[str], src: Path | None
) -> tuple[Proc, str]:
    cfg = work / f"{name}.yaml"
    cfg.write_text(json.dumps(config, indent=2))
    port = free_port()
    env, cwd = source_env(src)
    argv = [python, "-m", "rolemesh_gateway.gateway.cli", "--config", str(cfg), "--port", str(port)]
    proc = Proc(name, [*argv, "--log-level", "warning", *tls], work, env=env, cwd=cwd)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    return proc, url


def _wait(proc: Proc, port: int, ctx: ssl.SSLContext | None, timeout_s: float = 30) -> None:
    """Until ``GET /health`` answers 200 (over TLS with ``ctx``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
                s = ctx.wrap_socket(raw, server_hostname="localhost") if ctx else raw
                s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                if s.recv(12).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    proc.stop()
    raise TimeoutError(f"{proc.name} did not answer within {timeout_s:g}s:\n{proc.tail()}")


def run(
    work: Path, python: str, reps: int, duration_s: float, say: Callable[[str], None], src: Path | None = None
) -> dict[str, Any]:
    """Measure; returns ``{"plain": {c: [WrkResult]}, "tls": {...}}`` plus what was run."""
    certs = work / "certs"
    subprocess.run(
        ["bash", str(REPO / "scripts" / "make_certs.sh"), "-o", str(certs)], check=True, capture_output=True
    )
    procs: list[Proc] = []
    try:
        nginx, upstream = start_nginx(work)
        procs.append(nginx)
        config = gateway_config(upstream)
        plain, plain_url = _gateway(work, python, "rolemesh-plain", config, [], src)
        procs.append(plain)
        tls_args = [
            "--tls-cert-file",
            str(certs / "gateway.crt"),
            "--tls-key-file",
            str(certs / "gateway.key"),
        ]
        tls, tls_url = _gateway(work, python, "rolemesh-tls", config, tls_args, src)
        procs.append(tls)
        _wait(plain, int(plain_url.rsplit(":", 1)[1]), None)
        _wait(tls, int(tls_url.rsplit(":", 1)[1]), ssl.create_default_context(cafile=str(certs / "ca.crt")))
        script = write_script(work)
        targets = {"plain": (plain_url, plain.pid), "tls": (tls_url, tls.pid)}
        out: dict[str, dict[int, list[WrkResult]]] = {name: {c: [] for c in CONNECTIONS} for name in targets}
        for url, _ in targets.values():  # warm up: pools, caches, the first handshakes
            run_wrk(url + CHAT_PATH, script, CHAT_REQUEST, 16, 1, CLIENT_KEY)
        for rep in range(reps):
            for name, (url, pid) in targets.items():
                for c in CONNECTIONS:
                    res = run_wrk(url + CHAT_PATH, script, CHAT_REQUEST, c, duration_s, CLIENT_KEY, pid=pid)
                    out[name][c].append(res)
                    say(
                        f"rep {rep + 1} {name} c={c}: {res.rps:,.0f} req/s p50 {res.p50_ms:.3f} ms "
                        f"cpu {res.cpu_us or 0:.0f} us/req bad {res.bad}"
                    )
        return {"results": out, "reps": reps, "duration_s": duration_s}
    finally:
        for p in reversed(procs):
            p.stop()


def render(data: dict[str, Any], command: str) -> str:
    """The Markdown section for docs/benchmarks.md."""
    res: dict[str, dict[int, list[WrkResult]]] = data["results"]

    def med(name: str, c: int, field: str) -> float:
        return statistics.median(getattr(r, field) or 0.0 for r in res[name][c])

    lines = [
        "## TLS between the client and the gateway",
        "",
        f"`{command}`: medians of {data['reps']} interleaved wrk runs of {data['duration_s']:g} s, "
        "keep-alive connections, the non-streaming chat request through `rolemesh-gateway` to nginx.",
        "",
        "| connections | plain HTTP req/s | HTTPS req/s | plain p50 ms | HTTPS p50 ms | added p50 ms "
        "| plain CPU us/req | HTTPS CPU us/req |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in CONNECTIONS:
        p50p, p50t = med("plain", c, "p50_ms"), med("tls", c, "p50_ms")
        lines.append(
            f"| {c} | {med('plain', c, 'rps'):,.0f} | {med('tls', c, 'rps'):,.0f} | {p50p:.3f} | {p50t:.3f} "
            f"| {p50t - p50p:+.3f} | {med('plain', c, 'cpu_us'):.0f} | {med('tls', c, 'cpu_us'):.0f} |"
        )
    bad = sum(r.bad for runs in res.values() for rs in runs.values() for r in rs)
    lines += ["", f"Failed requests: {bad}."]
    return "\n".join(lines) + "\n"
