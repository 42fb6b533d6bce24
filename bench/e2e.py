"""End to end with the real llama-server and the tiny model: direct vs gateway + node agent.

The node agent starts and supervises one real ``llama-server`` (the deployment path); "direct"
talks to that same llama-server process on its private 127.0.0.1 port, so both paths share one
backend and the difference is exactly the two relay hops (gateway, then agent). Requests are
sequential (one slot), fixed length (``ignore_eos``), streaming and not, interleaved by rep.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import aiohttp

from .procs import Proc, free_port
from .targets import CLIENT_KEY, NODE_KEY, REPO, gateway_config, source_env, start_rolemesh

NEEDS = ("scripts/llama_server.sh", "scripts/make_tiny_model.py")
CACHE = Path(
    os.environ.get("ROLE_MESH_CACHE_DIR")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rolemesh"
)
AGENT = Path(sys.executable).parent / "rolemesh-node-agent"


def missing() -> str:
    """Why the case cannot run yet ('' when it can)."""
    gone = [p for p in NEEDS if not (REPO / p).exists()]
    if not AGENT.exists() and shutil.which("rolemesh-node-agent") is None:
        gone.append("the rolemesh-node-agent command")
    if gone:
        return "skipped: not in the repo yet: " + ", ".join(gone)
    return ""


def llama_server(say: Callable[[str], None]) -> str:
    """The real llama-server, via the project's script (builds it once, ~4 min, if not cached)."""
    say("finding llama-server (scripts/llama_server.sh builds it once if needed, ~4 minutes)")
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "llama_server.sh")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        timeout=1800,
        check=False,
    )
    if out.returncode != 0 or not out.stdout.strip():
        raise RuntimeError(f"scripts/llama_server.sh failed with {out.returncode}")
    return out.stdout.strip().splitlines()[-1]


def tiny_model(python: str, say: Callable[[str], None]) -> Path:
    """The random-weight GGUF, made once with scripts/make_tiny_model.py (same cache as the tests)."""
    given = os.environ.get("ROLE_MESH_TEST_MODEL")
    if given:
        return Path(given)
    path = CACHE / "models" / "tiny-llama.gguf"
    if not path.is_file():
        say("writing the tiny test model")
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".bench-partial.gguf")
        subprocess.run(
            [python, str(REPO / "scripts" / "make_tiny_model.py"), "--out", str(partial)],
            cwd=REPO,
            check=True,
            timeout=600,
        )
        partial.rename(path)
    return path


def _writer_listed(gw_url: str) -> bool:
    """True once the gateway lists ``writer`` as available (the agent registered, llama is ready)."""
    req = urllib.request.Request(gw_url + "/v1/models", headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return any(m.get("id") == "writer" for m in json.load(resp)["data"])
    except (OSError, ValueError, KeyError):
        return False


def _llama_port(agent_pid: int) -> int:
    """The private port of the llama-server the agent started (read from its command line)."""
    for child in Path(f"/proc/{agent_pid}/task").glob("*/children"):
        for pid in child.read_text().split():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"llama-server") and b"--port" in argv:
                return int(argv[argv.index(b"--port") + 1])
    raise RuntimeError("the node agent has no llama-server child")


async def _one(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], stream: bool, tokens: int
) -> tuple[int, float]:
    body = {
        "model": "writer",
        "messages": [{"role": "user", "content": "Write a long story."}],
        "max_tokens": tokens,
        "ignore_eos": True,  # random weights: a fixed length, whatever comes out
        "stream": stream,
        "temperature": 0.8,
    }
    t0 = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {(await resp.text())[:300]}")
        if not stream:
            data = await resp.json()
            return int(data["usage"]["completion_tokens"]), time.perf_counter() - t0
        n, buf = 0, b""
        async for chunk in resp.content.iter_any():
            buf += chunk
            *events, buf = buf.split(b"\n\n")
            for ev in events:
                if ev.startswith(b"data: {"):
                    choices = json.loads(ev[6:]).get("choices") or [{}]
                    if choices[0].get("delta", {}).get("content"):
                        n += 1
        return n, time.perf_counter() - t0


async def _measure(
    paths: dict[str, tuple[str, dict[str, str]]],
    reps: int,
    requests: int,
    tokens: int,
    say: Callable[[str], None],
    gateway_cpu: Callable[[], float],
) -> dict[str, dict[str, list[float]]]:
    """tokens/s per path and mode; requests alternate between the paths one by one, so that
    whatever else the machine does at a moment costs both paths alike."""
    out: dict[str, dict[str, list[float]]] = {p: {"stream": [], "plain": []} for p in paths}
    out["gateway CPU us/token"] = {"stream": [], "plain": []}
    out["errors"] = {p: [] for p in paths}  # failed requests per path (each retried once)
    timeout = aiohttp.ClientTimeout(total=120)
    # llama-server closes its end after a streamed response although it announced keep-alive,
    # so a pooled connection to it fails on the next request: a fresh connection each time.
    direct = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(force_close=True))
    pooled = aiohttp.ClientSession(timeout=timeout)
    async with direct, pooled:
        sessions = {label: direct if not hdrs else pooled for label, (_, hdrs) in paths.items()}
        for label, (url, hdrs) in paths.items():  # warm-up: prompt cache, pooled connections
            await _one(sessions[label], url, hdrs, True, 16)
        for rep in range(reps):
            for mode in ("stream", "plain"):
                got = {label: [0, 0.0] for label in paths}
                cpu0 = gateway_cpu()
                for _ in range(requests):
                    for label, (url, hdrs) in paths.items():
                        for _attempt in range(2):
                            try:
                                n, took = await _one(sessions[label], url, hdrs, mode == "stream", tokens)
                            except (RuntimeError, aiohttp.ClientError, TimeoutError) as exc:
                                out["errors"][label].append(1.0)
                                say(f"e2e {label} {mode}: request failed: {exc}")
                                continue
                            got[label][0] += n
                            got[label][1] += took
                            break
                gw_tokens = got["gateway + node agent"][0]
                out["gateway CPU us/token"][mode].append((gateway_cpu() - cpu0) * 1e6 / max(1, gw_tokens))
                for label, (n, secs) in got.items():
                    out[label][mode].append(n / secs)
                say(
                    f"rep {rep + 1} e2e {mode}: "
                    + ", ".join(f"{label} {n / secs:,.0f} tokens/s" for label, (n, secs) in got.items())
                )
    return out


def run(
    work: Path, python: str, quick: bool, reps: int, say: Callable[[str], None], src: Path | None = None
) -> dict[str, object]:
    binary = llama_server(say)
    model = tiny_model(python, say)
    tokens, requests = (64, 3) if quick else (256, 25)
    agent_port = free_port()
    gw, gw_url = start_rolemesh(work, python, "rolemesh-e2e", gateway_config("http://127.0.0.1:9"), src)
    agent: Proc | None = None
    try:
        cfg = {
            "version": 1,
            "node_id": "bench-node",
            "gateway_url": gw_url,
            "node_key": NODE_KEY,
            "port": agent_port,
            "heartbeat_interval_s": 5,
            "roles": {
                "writer": {
                    "llama_server": {
                        "model": str(model),
                        "binary": binary,
                        "args": ["-c", "1024", "-n", str(tokens), "-t", "1", "--chat-template", "chatml"],
                    }
                }
            },
        }
        path = work / "agent.yaml"
        path.write_text(json.dumps(cfg, indent=2))
        env, cwd = source_env(src)
        agent = Proc("node-agent", [str(AGENT), "--config", str(path)], work, env=env, cwd=cwd)
        say("waiting for the node agent's llama-server to load and the agent to register")
        deadline = time.monotonic() + 300
        while not _writer_listed(gw_url):
            if not agent.alive():
                raise RuntimeError(f"node agent exited:\n{agent.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"writer not available through the gateway after 300 s:\n{agent.tail()}")
            time.sleep(0.25)
        direct = f"http://127.0.0.1:{_llama_port(agent.pid)}"
        paths = {
            "direct to llama-server": (direct, {}),
            "gateway + node agent": (gw_url, {"Authorization": f"Bearer {CLIENT_KEY}"}),
            # Diagnostic: the agent's hop alone (it takes the node key, as from the gateway).
            "node agent only": (f"http://127.0.0.1:{agent_port}", {"X-RoleMesh-Node-Key": NODE_KEY}),
        }
        raw = asyncio.run(_measure(paths, reps, requests, tokens, say, gw.cpu_s))
    finally:
        if agent is not None:
            agent.stop(30)
        gw.stop()
    from statistics import median

    result: dict[str, object] = {"paths": list(paths), "max_tokens": tokens, "requests": requests}
    errors = raw.pop("errors")
    result["errors"] = {label: len(v) for label, v in errors.items()}
    for label, modes in raw.items():
        result[label] = {mode: median(v) for mode, v in modes.items()}
    d, g = result["direct to llama-server"], result["gateway + node agent"]
    assert isinstance(d, dict) and isinstance(g, dict)
    result["ratio_stream"] = g["stream"] / d["stream"]
    result["ratio_plain"] = g["plain"] / d["plain"]
    result["ratio"] = min(result["ratio_stream"], result["ratio_plain"])  # type: ignore[type-var]
    return result
