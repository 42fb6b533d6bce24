"""The ``fleet`` case: round_robin, least_busy and cache_aware on real llama-servers.

Node agents (``--fleet-nodes``, default 2: one per core of the machine) each start a real
llama-server with one thread, pinned to a CPU of its own with ``taskset``, serving a
random-weight model made bigger than the test model so that prompt processing matters
(:data:`DIMS`: 4 layers, width 256, 83 MB; a 2,100-token prompt takes about 430 ms on one
thread of this machine, and 17 ms when llama-server finds it cached).

The workload is an agent conversation load: ``--fleet-conversations`` conversations at once,
each a shared long system prompt (about 800 tokens) plus its own history, growing by a
~250-token "tool output" user message and a short answer (8 tokens) every turn, over
``--fleet-turns`` turns. Every strategy gets the same conversations (same seeds), on freshly
started nodes (empty caches). Per strategy: time to first token p50/p95, completion tokens/s
over the fleet, the prompt cache hit rate (llama-server's ``cached_tokens`` over prompt tokens)
and each node's share of the requests. An extra row runs two gateways on one Redis registry
behind a client that alternates between them request by request (each gateway keeps its own
prefix map), and one more the same with an ``X-Session-Id`` per conversation (the session
ring is the same on every gateway).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from .e2e import AGENT, CACHE, llama_server
from .procs import Proc, free_port
from .routing import words
from .targets import CLIENT_KEY, NODE_KEY, REPO, source_env, start_rolemesh

#: The model's shape (scripts/make_tiny_model.py options) and its declared context.
DIMS = {"layers": 4, "width": 256}
MODEL_CTX = 16384
SYSTEM_WORDS = 600
USER_WORDS = 80
MAX_TOKENS = 8


@dataclass(frozen=True)
class Row:
    label: str
    strategy: str
    gateways: int = 1
    session: bool = False


ROWS = (
    Row("round_robin", "round_robin"),
    Row("least_busy", "least_busy"),
    Row("cache_aware", "cache_aware"),
    Row("cache_aware, 2 gateways (Redis)", "cache_aware", gateways=2),
    Row("cache_aware, 2 gateways + X-Session-Id", "cache_aware", gateways=2, session=True),
)


@dataclass
class Turn:
    conversation: int
    turn: int
    ttft_s: float
    prompt: int
    cached: int
    completion: int


def fleet_model(python: str, say: Callable[[str], None]) -> Path:
    """The bigger random-weight model, made once (same cache as the tests' tiny one)."""
    path = CACHE / "models" / f"fleet-llama-l{DIMS['layers']}-w{DIMS['width']}.gguf"
    if not path.is_file():
        say(f"writing the fleet model {path.name}")
        partial = path.with_suffix(".partial.gguf")
        args = [f"--{k}={v}" for k, v in DIMS.items()]
        ctx = ["--context-length", str(MODEL_CTX)]
        subprocess.run(
            [python, str(REPO / "scripts" / "make_tiny_model.py"), "--out", str(partial), *args, *ctx],
            cwd=REPO,
            check=True,
            timeout=600,
        )
        partial.rename(path)
    return path


def _get(url: str, path: str) -> Any:
    req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.read()


def _fresh_nodes(url: str) -> int:
    try:
        data = json.loads(_get(url, "/v1/nodes"))["data"]
    except (OSError, ValueError, KeyError):
        return 0
    return sum(1 for n in data if n["status"] == "fresh")


def _served(url: str) -> Counter[str]:
    """Successful attempts per node, from a gateway's /metrics."""
    out: Counter[str] = Counter()
    for line in _get(url, "/metrics").decode().splitlines():
        if line.startswith("rolemesh_upstream_attempts_total{") and 'outcome="ok"' in line:
            labels, value = line.rsplit(" ", 1)
            node = labels.split('node="', 1)[1].split('"', 1)[0]
            out[node] += int(float(value))
    return out


class Fleet:
    """One row: gateways (and Redis), node agents, the conversations."""

    def __init__(
        self,
        work: Path,
        python: str,
        say: Callable[[str], None],
        binary: str,
        model: Path,
        nodes: int,
        src: Path | None,
        cache_mib: int | None,
    ) -> None:
        self.work, self.python, self.say = work, python, say
        self.binary, self.model, self.nodes, self.src = binary, model, nodes, src
        self.cache_mib = cache_mib
        self.redis: Proc | None = None
        self.redis_url = ""

    def start_redis(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("the two-gateway rows need redis-server (apt-get install redis-server)")
        port = free_port()
        self.redis = Proc(
            "fleet-redis",
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            self.work,
        )
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).returncode:
            if time.monotonic() > deadline:
                raise TimeoutError("redis-server did not answer within 10 s")
            time.sleep(0.1)

    def config(self, row: Row, index: int, seed: int) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "version": 1,
            "default_model": "planner",
            "auth": {"client_api_keys": [CLIENT_KEY], "node_api_keys": [NODE_KEY]},
            "models": {"planner": {"type": "discovered", "role": "planner", "strategy": row.strategy}},
        }
        if row.gateways > 1:
            cfg["registry"] = {
                "backend": "redis",
                "redis_url": self.redis_url,
                "key_prefix": f"fleet{index}r{seed}",
            }
        return cfg

    def agent(self, gw_url: str, i: int) -> Proc:
        cpus = sorted(os.sched_getaffinity(0))
        cfg = {
            "version": 1,
            "node_id": f"fleet-node-{i + 1}",
            "gateway_url": gw_url,
            "node_key": NODE_KEY,
            "port": free_port(),
            "heartbeat_interval_s": 1,
            "roles": {
                "planner": {
                    "llama_server": {
                        "model": str(self.model),
                        "binary": self.binary,
                        "args": ["-c", str(MODEL_CTX), "-t", "1", "--chat-template", "chatml"],
                        **({"prompt_cache_mib": self.cache_mib} if self.cache_mib is not None else {}),
                    }
                }
            },
        }
        path = self.work / f"fleet-agent-{i + 1}.yaml"
        path.write_text(json.dumps(cfg, indent=2))
        env, cwd = source_env(self.src)
        # The agent and its llama-server on one CPU of their own (children inherit affinity).
        argv = ["taskset", "-c", str(cpus[i % len(cpus)]), str(AGENT), "--config", str(path)]
        return Proc(f"fleet-agent-{i + 1}", argv, self.work, env=env, cwd=cwd)

    def row(
        self, row: Row, index: int, conversations: int, turns: int, seed: int
    ) -> tuple[list[Turn], float, Counter[str]]:
        """One run of the workload on fresh nodes: every turn, the wall time, requests per node."""
        procs: list[Proc] = []
        try:
            gws: list[str] = []
            for g in range(row.gateways):
                proc, url = start_rolemesh(
                    self.work, self.python, f"fleet-gw-{index}-{g}", self.config(row, index, seed), self.src
                )
                procs.append(proc)
                gws.append(url)
            agents = [self.agent(gws[0], i) for i in range(self.nodes)]
            procs.extend(agents)
            deadline = time.monotonic() + 120
            while not all(_fresh_nodes(url) == self.nodes for url in gws):
                for a in agents:
                    if not a.alive():
                        raise RuntimeError(f"node agent exited:\n{a.tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError("the fleet's nodes were not all fresh after 120 s")
                time.sleep(0.25)
            started = time.perf_counter()
            done = asyncio.run(_workload(gws, conversations, turns, row.session, seed))
            wall = time.perf_counter() - started
            served: Counter[str] = Counter()
            for url in gws:
                served.update(_served(url))
        finally:
            for p in reversed(procs):
                p.stop(30)
        return done, wall, served


async def _workload(gws: list[str], conversations: int, turns: int, session: bool, seed: int) -> list[Turn]:
    counter = iter(range(10**9))
    out: list[Turn] = []
    system = "You are the operations agent. Follow the rules below.\n" + words(random.Random(0), SYSTEM_WORDS)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def talk(c: int) -> None:
            rng = random.Random(seed * 1000 + c)
            await asyncio.sleep(rng.uniform(0, 0.5))
            messages: list[dict[str, str]] = [{"role": "system", "content": system}]
            for t in range(turns):
                messages.append({"role": "user", "content": f"Task {c} step {t}: " + words(rng, USER_WORDS)})
                url = gws[next(counter) % len(gws)]
                headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
                if session:
                    headers["X-Session-Id"] = f"conversation-{c}"
                turn, answer = await _ask(http, url, headers, messages, c, t)
                out.append(turn)
                messages.append({"role": "assistant", "content": answer})
                await asyncio.sleep(rng.uniform(0.3, 1.0))  # the agent acts on the answer

        await asyncio.gather(*(talk(c) for c in range(conversations)))
    return out


async def _ask(
    http: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    messages: list[dict[str, str]],
    c: int,
    t: int,
) -> tuple[Turn, str]:
    body = {
        "model": "planner",
        "messages": messages,
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = 0.0
    text: list[str] = []
    usage: dict[str, Any] = {}
    async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
        buf = b""
        async for chunk in resp.content.iter_any():
            buf += chunk
            *events, buf = buf.split(b"\n\n")
            for ev in events:
                if not ev.startswith(b"data: {"):
                    continue
                data = json.loads(ev[6:])
                if data.get("usage"):
                    usage = data["usage"]
                for choice in data.get("choices") or ():
                    content = (choice.get("delta") or {}).get("content")
                    if content is not None:
                        first = first or time.perf_counter() - t0
                        text.append(content)
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
    turn = Turn(
        c, t, first, int(usage.get("prompt_tokens", 0)), cached, int(usage.get("completion_tokens", 0))
    )
    return turn, "".join(text)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(
    row: Row, done: list[Turn], wall: float, served: Counter[str], nodes: int, turns: int
) -> dict[str, Any]:
    ttft = [d.ttft_s for d in done]
    prompt = sum(d.prompt for d in done)
    total = sum(served.values())
    return {
        "label": row.label,
        "requests": len(done),
        "ttft_p50_ms": statistics.median(ttft) * 1000,
        "ttft_p95_ms": _pct(ttft, 0.95) * 1000,
        "tokens_per_s": sum(d.completion for d in done) / wall,
        "wall_s": wall,
        "hit_rate": sum(d.cached for d in done) / prompt if prompt else 0.0,
        "prompt_tokens": prompt,
        "shares": {n: served[n] / total for n in sorted(served)} if total else {},
        "max_share": max(served.values()) / total if total else 0.0,
        "nodes": nodes,
        "by_turn_ms": [
            statistics.median(d.ttft_s for d in done if d.turn == t) * 1000
            for t in range(turns)
            if any(d.turn == t for d in done)
        ],
    }


def run(
    work: Path,
    python: str,
    quick: bool,
    say: Callable[[str], None],
    src: Path | None = None,
    nodes: int = 2,
    conversations: int = 6,
    turns: int = 10,
    chart: Path | None = None,
    cache_mib: int | None = None,
    reps: int = 3,
) -> dict[str, Any]:
    if quick:
        conversations, turns, reps = 2, 2, 1
    binary = llama_server(say)
    model = fleet_model(python, say)
    fleet = Fleet(work, python, say, binary, model, nodes, src, cache_mib)
    load_before = os.getloadavg()
    done: dict[int, list[Turn]] = {i: [] for i in range(len(ROWS))}
    wall = dict.fromkeys(range(len(ROWS)), 0.0)
    served: dict[int, Counter[str]] = {i: Counter() for i in range(len(ROWS))}
    try:
        fleet.start_redis()
        for r in range(reps):
            # Every strategy runs the same conversations (seed = r); the order rotates from one
            # round to the next so that a burst of other work on the machine hits each alike.
            order = list(range(len(ROWS)))
            order = order[r % len(order) :] + order[: r % len(order)]
            for index in order:
                row = ROWS[index]
                say(
                    f"fleet round {r + 1}/{reps}: {row.label} ({conversations} conversations x {turns} turns)"
                )
                d, w, got = fleet.row(row, index, conversations, turns, r + 1)
                done[index] += d
                wall[index] += w
                served[index].update(got)
    finally:
        if fleet.redis is not None:
            fleet.redis.stop()
    rows = [_summary(row, done[i], wall[i], served[i], nodes, turns) for i, row in enumerate(ROWS)]
    for result in rows:
        say(
            f"fleet: {result['label']}: TTFT p50 {result['ttft_p50_ms']:.0f} ms, "
            f"hit rate {result['hit_rate']:.0%}, max node share {result['max_share']:.0%}"
        )
    out = {
        "rows": rows,
        "nodes": nodes,
        "conversations": conversations,
        "turns": turns,
        "reps": reps,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "model": model.name,
        "model_mb": model.stat().st_size / 1e6,
        "cache_mib": cache_mib,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if chart is not None:
        out["chart"] = draw(out, chart)
    return out


def draw(result: dict[str, Any], path: Path) -> str:
    """TTFT by turn, one line per strategy (PNG); returns the path or why there is none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no chart: matplotlib is not installed (pip install -e '.[dev]')"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for row in result["rows"]:
        by_turn = row["by_turn_ms"]
        ax.plot(range(1, len(by_turn) + 1), by_turn, marker="o", label=row["label"])
    ax.set_xlabel("turn of the conversation")
    ax.set_ylabel("time to first token, median (ms)")
    ax.set_title(
        f"{result['conversations']} conversations on {result['nodes']} llama-server nodes "
        f"(shared system prompt, growing history)",
        fontsize=9,
    )
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def targets(rows: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    by = {r["label"]: r for r in rows}
    rr, lb, ca = by.get("round_robin"), by.get("least_busy"), by.get("cache_aware")
    if not (rr and lb and ca):
        return []
    return [
        (
            "TTFT p50 <= 0.5x round_robin",
            ca["ttft_p50_ms"] <= 0.5 * rr["ttft_p50_ms"],
            f"{ca['ttft_p50_ms'] / rr['ttft_p50_ms']:.2f}x",
        ),
        (
            "TTFT p50 <= 0.7x least_busy",
            ca["ttft_p50_ms"] <= 0.7 * lb["ttft_p50_ms"],
            f"{ca['ttft_p50_ms'] / lb['ttft_p50_ms']:.2f}x",
        ),
        (
            "fleet tokens/s >= both",
            ca["tokens_per_s"] >= max(rr["tokens_per_s"], lb["tokens_per_s"]),
            f"{ca['tokens_per_s']:.1f} vs {rr['tokens_per_s']:.1f} / {lb['tokens_per_s']:.1f}",
        ),
        ("no node above 70% of requests", ca["max_share"] <= 0.7, f"max {ca['max_share']:.0%}"),
    ]


def render(r: dict[str, Any], command: str) -> str:
    lb, la = r["load_before"], r["load_after"]
    out = [
        "## Fleet: cache-aware routing on real llama-servers (`--cases fleet`)",
        "",
        f"Command: `{command}`; run {r['when']}. {r['nodes']} node agents, each with one real "
        f"llama-server (`-t 1`, pinned to a CPU of its own with `taskset`, the agent's default "
        f"4 slots and unified KV, prompt-cache RAM {r['cache_mib'] or 2048} MiB), "
        f"model `{r['model']}` ({r['model_mb']:.0f} MB, "
        f"random weights, {DIMS['layers']} layers, width {DIMS['width']}). {r['conversations']} "
        f"concurrent conversations x {r['turns']} turns: a shared ~700-token system prompt, a "
        f"~100-token user message per turn, {MAX_TOKENS}-token answers, streamed, 0.3-1.0 s between "
        f"an answer and the next turn; {r['reps']} rounds, each running every row once on fresh "
        f"nodes (empty caches), in rotating order; samples pooled. Machine load average before / after: "
        f"{lb[0]:.2f} / {la[0]:.2f} (other work shares these 2 cores).",
        "",
        "| strategy | TTFT p50 (ms) | TTFT p95 (ms) | completion tokens/s | prompt cache hit rate | "
        "requests per node |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in r["rows"]:
        shares = ", ".join(f"{share:.0%}" for share in row["shares"].values())
        out.append(
            f"| {row['label']} | {row['ttft_p50_ms']:.0f} | {row['ttft_p95_ms']:.0f} | "
            f"{row['tokens_per_s']:.1f} | {row['hit_rate']:.0%} | {shares} |"
        )
    out.append("")
    checks = targets(r["rows"])
    if checks:
        out += ["| target (cache_aware) | met | measured |", "|---|---|---|"]
        out += [f"| {name} | {'yes' if ok else 'NO'} | {measured} |" for name, ok, measured in checks]
        out.append("")
    out.append("TTFT median by turn (ms): ")
    out.append("")
    for row in r["rows"]:
        out.append(f"- {row['label']}: " + ", ".join(f"{ms:.0f}" for ms in row["by_turn_ms"]))
    out.append("")
    if "chart" in r:
        out += [f"Chart: `{r['chart']}`", ""]
    return "\n".join(out)


if __name__ == "__main__":  # a fleet run on its own: python -m bench.fleet
    import tempfile

    def _say(msg: str) -> None:
        print(f"[fleet {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    result = run(Path(tempfile.mkdtemp(prefix="rolemesh-fleet-")), sys.executable, False, _say)
    print(render(result, "python -m bench.fleet"))
