"""Where does the gateway's time go? A py-spy profile of one gateway under wrk load.

Starts nginx (the fixed chat completion) and one gateway exactly as the benchmark does, runs
wrk against it for ``--duration`` seconds and records the gateway with py-spy meanwhile;
prints the top functions by own time and keeps the collapsed stacks.

    python -m bench.profile --py-spy /path/to/py-spy [--connections 64] [--duration 10]

py-spy is not a project dependency: install it anywhere (``pip install py-spy`` in a scratch
venv) and pass its path. Needs ptrace rights over the gateway (root, or
``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .procs import Proc
from .targets import CLIENT_KEY, NODE_KEY, REPO, gateway_config, start_rolemesh
from .upstreams import CHAT_REQUEST, start_nginx, start_sse
from .wrk import run_wrk, write_script


def top_functions(raw: Path, limit: int) -> list[tuple[float, str]]:
    """Own-time share per function from py-spy's ``--format raw`` (collapsed stacks)."""
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        own[stack.split(";")[-1]] += n
    return [(100 * n / total, fn) for fn, n in own.most_common(limit)] if total else []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--py-spy", required=True, help="path to the py-spy binary")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--streams", type=int, default=0, help="profile N concurrent SSE streams instead")
    p.add_argument("--fleet", type=int, default=0, help="profile N nodes heartbeating every 10 s instead")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--gateway-src", type=Path, default=None, help="run the gateway from this tree")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rolemesh-profile-"))
    procs: list[Proc] = []
    try:
        if a.streams:
            chunks = 20_000
            upstream_proc, upstream = start_sse(work, sys.executable, chunks, 0.0)
        else:
            upstream_proc, upstream = start_nginx(work)
        procs.append(upstream_proc)
        gw, url = start_rolemesh(work, sys.executable, "gateway", gateway_config(upstream), a.gateway_src)
        procs.append(gw)
        url += "/v1/chat/completions"
        script = write_script(work)
        if a.fleet:
            gateway = url.removesuffix("/v1/chat/completions")
            argv = ["--gateway", gateway, "--node-key", NODE_KEY, "--nodes", str(a.fleet)]
            argv += ["--base-url", upstream, "--duration", str(a.duration + 30)]
            sim = Proc(
                "fleet",
                [sys.executable, "-m", "bench.discovery", *argv],
                work,
                cwd=str(REPO),
                stdout_pipe=True,
            )
            procs.append(sim)
            print(sim.readline(timeout_s=120 + a.fleet / 100).strip())  # all registered
        elif not a.streams:
            run_wrk(url, script, CHAT_REQUEST, a.connections, 2, CLIENT_KEY)  # warm up
        raw = work / "profile.txt"
        spy = [a.py_spy, "record", "--pid", str(gw.pid), "--duration", str(round(a.duration))]
        recorder = threading.Thread(
            target=subprocess.run, args=([*spy, "--rate", "500", "--format", "raw", "-o", str(raw)],)
        )
        recorder.start()
        if a.fleet:
            time.sleep(a.duration)
        elif a.streams:
            load = [sys.executable, "-m", "bench.streams", "--url", url, "--key", CLIENT_KEY]
            load += ["--streams", str(a.streams), "--chunks", str(chunks), "--timeout", str(a.duration + 60)]
            out = subprocess.run(load, capture_output=True, text=True, timeout=a.duration + 90, check=False)
            print(out.stdout.strip() or out.stderr[-500:])
        else:
            result = run_wrk(url, script, CHAT_REQUEST, a.connections, a.duration, CLIENT_KEY)
            print(f"{result.rps:,.0f} req/s, p50 {result.p50_ms:.3f} ms at c={a.connections}")
        recorder.join(a.duration + 30)
        for share, fn in top_functions(raw, a.top):
            print(f"{share:5.1f}%  {fn}")
        print(f"collapsed stacks (for flamegraph.pl or speedscope): {raw}")
    finally:
        for proc in reversed(procs):
            proc.stop()


if __name__ == "__main__":
    main()
