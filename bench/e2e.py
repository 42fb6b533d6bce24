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
from dataclasses import dataclass
from pathlib import Path
from statistics import median

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


def _llama(agent_pid: int) -> tuple[int, int]:
    """Pid and private port of the llama-server the agent started (from its command line)."""
    for child in Path(f"/proc/{agent_pid}/task").glob("*/children"):
        for pid in child.read_text().split():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"llama-server") and b"--port" in argv:
                return int(pid), int(argv[argv.index(b"--port") + 1])
    raise RuntimeError("the node agent has no llama-server child")


@dataclass(frozen=True)
class Sample:
    """One request as the client saw it."""

    tokens: int
    wall_s: float  # request sent -> answer complete
    first_s: float = 0.0  # request sent -> first token (streaming)
    last_s: float = 0.0  # request sent -> last token (streaming)

    def rate(self, mode: str) -> float:
        if mode == "decode":  # first -> last token: the pace at which a reader sees the text
            return (self.tokens - 1) / (self.last_s - self.first_s) if self.last_s > self.first_s else 0.0
        return self.tokens / self.wall_s


async def _one(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], stream: bool, tokens: int
) -> Sample:
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
            return Sample(int(data["usage"]["completion_tokens"]), time.perf_counter() - t0)
        n, buf, first, last = 0, b"", 0.0, 0.0
        async for chunk in resp.content.iter_any():
            now = time.perf_counter() - t0
            buf += chunk
            *events, buf = buf.split(b"\n\n")
            for ev in events:
                if ev.startswith(b"data: {"):
                    choices = json.loads(ev[6:]).get("choices") or [{}]
                    if choices[0].get("delta", {}).get("content"):
                        n += 1
                        first = first or now
                        last = now
        return Sample(n, time.perf_counter() - t0, first, last)


#: What is reported per path: tokens/s streaming (whole request, and first -> last token),
#: non-streaming, and the time to the first streamed token.
MODES = ("stream", "decode", "plain", "first_ms")


async def _measure(
    paths: dict[str, tuple[str, dict[str, str]]],
    reps: int,
    requests: int,
    tokens: int,
    say: Callable[[str], None],
    gateway_cpu: Callable[[], float],
) -> dict[str, dict[str, list[float]]]:
    """Per path, per figure of :data:`MODES`: one median per rep.

    Requests alternate between the paths one by one, and the order rotates from one round to
    the next (no path always goes first, right after a pause), so that whatever else the
    machine does at a moment costs every path alike. Each rep reports its median request:
    this machine's noise comes in bursts that stretch a few requests by up to 50%, whichever
    path they happen to hit.
    """
    out: dict[str, dict[str, list[float]]] = {p: {m: [] for m in MODES} for p in paths}
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
                samples: dict[str, list[Sample]] = {label: [] for label in paths}
                cpu0 = gateway_cpu()
                labels = list(paths)
                for i in range(requests):
                    for label in labels[i % len(labels) :] + labels[: i % len(labels)]:
                        url, hdrs = paths[label]
                        for _attempt in range(2):
                            try:
                                got = await _one(sessions[label], url, hdrs, mode == "stream", tokens)
                            except (RuntimeError, aiohttp.ClientError, TimeoutError) as exc:
                                out["errors"][label].append(1.0)
                                say(f"e2e {label} {mode}: request failed: {exc}")
                                continue
                            samples[label].append(got)
                            break
                gw_tokens = sum(x.tokens for x in samples["gateway + node agent"])
                out["gateway CPU us/token"][mode].append((gateway_cpu() - cpu0) * 1e6 / max(1, gw_tokens))
                for label, done in samples.items():
                    if not done:
                        continue
                    if mode == "plain":
                        out[label]["plain"].append(median(x.rate("plain") for x in done))
                        continue
                    out[label]["stream"].append(median(x.rate("stream") for x in done))
                    out[label]["decode"].append(median(x.rate("decode") for x in done))
                    out[label]["first_ms"].append(median(x.first_s * 1000 for x in done))
                say(
                    f"rep {rep + 1} e2e {mode}: "
                    + ", ".join(f"{label} {out[label][mode][-1]:,.0f} tokens/s" for label in paths)
                )
    return out


def pin_apart(model_pid: int, relay_pids: list[int]) -> str:
    """llama-server on the last CPU, the relays and the client on the others; '' if impossible.

    As on a host that runs the model on CPU, where one gives the model cores of its own: the
    comparison is then about what the two relay hops cost, not about where the scheduler puts
    a relay's wake-up on 2 cores (the same pinning holds for the direct path).
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return ""
    model, rest = {cpus[-1]}, set(cpus[:-1])
    for pid, where in [(model_pid, model)] + [(p, rest) for p in relay_pids]:
        for task in Path(f"/proc/{pid}/task").iterdir():
            os.sched_setaffinity(int(task.name), where)
    return f"llama-server on CPU {cpus[-1]}; client, gateway and node agent on CPU {min(rest)}-{max(rest)}"


def run(
    work: Path,
    python: str,
    quick: bool,
    reps: int,
    say: Callable[[str], None],
    src: Path | None = None,
    pin: bool = True,
) -> dict[str, object]:
    binary = llama_server(say)
    model = tiny_model(python, say)
    tokens, requests = (64, 3) if quick else (256, 25)
    agent_port = free_port()
    gw, gw_url = start_rolemesh(work, python, "rolemesh-e2e", gateway_config("http://127.0.0.1:9"), src)
    agent: Proc | None = None
    ours = os.sched_getaffinity(0)
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
        llama_pid, llama_port = _llama(agent.pid)
        direct = f"http://127.0.0.1:{llama_port}"
        placement = pin_apart(llama_pid, [gw.pid, agent.pid, os.getpid()]) if pin else ""
        if placement:
            say(placement)
        paths = {
            "direct to llama-server": (direct, {}),
            "gateway + node agent": (gw_url, {"Authorization": f"Bearer {CLIENT_KEY}"}),
            # Diagnostic: the agent's hop alone (it takes the node key, as from the gateway).
            "node agent only": (f"http://127.0.0.1:{agent_port}", {"X-RoleMesh-Node-Key": NODE_KEY}),
        }
        raw = asyncio.run(_measure(paths, reps, requests, tokens, say, gw.cpu_s))
    finally:
        os.sched_setaffinity(0, ours)
        if agent is not None:
            agent.stop(30)
        gw.stop()
    result: dict[str, object] = {"paths": list(paths), "max_tokens": tokens, "requests": requests}
    result["placement"] = placement or "unpinned: the scheduler places every process"
    errors = raw.pop("errors")
    result["errors"] = {label: len(v) for label, v in errors.items()}
    for label, modes in raw.items():
        result[label] = {mode: median(v) for mode, v in modes.items()}
    # Ratios are taken rep by rep (both paths measured in the same minute), then the median.
    d, g = raw["direct to llama-server"], raw["gateway + node agent"]
    for mode in ("stream", "decode", "plain"):
        reps_ratio = [gw / direct for gw, direct in zip(g[mode], d[mode], strict=True) if direct]
        result[f"ratio_{mode}"] = median(reps_ratio) if reps_ratio else 0.0
        result[f"ratio_{mode}_reps"] = reps_ratio
    result["added_first_ms"] = median(
        gw - direct for gw, direct in zip(g["first_ms"], d["first_ms"], strict=True)
    )
    # Target 4: the pace of generation as the client sees it, streaming and not.
    result["ratio"] = min(result["ratio_decode"], result["ratio_plain"])  # type: ignore[type-var]
    return result
