"""wrk runs: POST a chat completion over keep-alive connections, count non-2xx, read percentiles.

wrk's own ``errors.status`` counts only statuses >= 400, so the Lua script counts every
status outside 200-299 itself and prints one JSON line from ``done()`` with wrk's exact
latency percentiles (microseconds).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .procs import cpu_seconds

_LUA = r"""
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("BENCH_KEY")
if key and key ~= "" then wrk.headers["Authorization"] = "Bearer " .. key end

local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) non2xx = 0 end
function response(status, headers, body)
  if status < 200 or status > 299 then non2xx = non2xx + 1 end
end
function done(summary, latency, requests)
  local bad = 0
  for _, t in ipairs(threads) do bad = bad + t:get("non2xx") end
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"non2xx":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, bad, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non2xx: int
    socket_errors: int
    #: CPU time the target process spent per request (None when not measured).
    cpu_us: float | None = None

    @property
    def bad(self) -> int:
        return self.non2xx + self.socket_errors


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise FileNotFoundError("wrk is not installed (bench/run.sh installs it with apt-get)")
    return found


def write_script(work: Path) -> Path:
    path = work / "post.lua"
    path.write_text(_LUA)
    return path


def run_wrk(
    url: str,
    script: Path,
    body: str,
    connections: int,
    duration_s: float,
    key: str = "",
    timeout_s: float = 10.0,
    pid: int | None = None,
) -> WrkResult:
    """One wrk run against ``url``; raises if wrk fails or prints no result."""
    threads = 1 if connections < 16 else 2
    argv = [
        wrk_binary(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        f"--timeout={timeout_s:g}s",
        "-s",
        str(script),
        url,
    ]
    env = {"BENCH_BODY": body, "BENCH_KEY": key, "PATH": "/usr/bin:/bin"}
    cpu0 = cpu_seconds(pid) if pid else 0.0
    proc = subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=duration_s + timeout_s + 30, check=False
    )
    cpu = cpu_seconds(pid) - cpu0 if pid else 0.0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout[-500:]}")
    r = json.loads(line[6:])
    seconds = r["duration_us"] / 1e6
    return WrkResult(
        rps=r["requests"] / seconds if seconds else 0.0,
        p50_ms=r["p50_us"] / 1000,
        p99_ms=r["p99_us"] / 1000,
        requests=r["requests"],
        non2xx=r["non2xx"],
        socket_errors=r["connect"] + r["read"] + r["write"] + r["timeout"],
        cpu_us=cpu * 1e6 / r["requests"] if pid and r["requests"] else None,
    )
