"""The benchmark run: start everything, measure every case, print one Markdown report.

``bash bench/run.sh`` installs what is missing and calls ``python -m bench.harness``.
``main()`` parses options; :class:`Bench` runs the cases in order. A case that fails is
reported and the run goes on; the exit status is 1 if any case failed or any request errored
(a benchmark is not a test of speed, but wrong answers under load are bugs).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import e2e, fleet, report, routing, soak, tls
from .procs import Proc
from .targets import (
    CLIENT_KEY,
    LITELLM_KEY,
    NODE_KEY,
    REPO,
    gateway_config,
    start_bare_relay,
    start_litellm,
    start_rolemesh,
)
from .upstreams import CHAT_REQUEST, start_nginx, start_sse
from .wrk import WrkResult, run_wrk, write_script

CONNECTIONS = (1, 16, 64)
#: Target name of the gateway run from ``--compare-src``.
COMPARE = "RoleMesh (compare-src)"
CHAT_PATH = "/v1/chat/completions"
#: Cases that run only when named in ``--cases``, each with its own report section.
ON_REQUEST = frozenset({"soak", "tls", "routing", "fleet"})


@dataclass(frozen=True)
class Options:
    quick: bool
    reps: int
    duration_s: float
    streams: int
    chunks: int
    chunk_interval_s: float
    nodes: int
    heartbeat_s: float
    litellm_venv: Path | None
    litellm_skip_reason: str
    e2e: bool
    keep: bool
    cases: tuple[str, ...] = ("non-streaming", "streaming", "discovery", "end-to-end")
    #: Run the gateway (and node agent) from this source tree instead of the installed package.
    gateway_src: Path | None = None
    #: End to end: llama-server on a core of its own, everything else on the others.
    e2e_pin: bool = True
    #: Also measure a gateway from this tree, interleaved with the checkout's (an A/B in one run).
    compare_src: Path | None = None
    #: How long the soak case runs (only with ``--cases soak``: never by default nor with --quick).
    soak_s: float = 600.0
    #: The fleet case (only with ``--cases fleet``): nodes, conversations, turns, chart path.
    fleet_nodes: int = 2
    fleet_conversations: int = 6
    fleet_turns: int = 10
    fleet_chart: Path | None = None
    fleet_cache_mib: int | None = None
    fleet_reps: int = 3


@dataclass
class Results:
    nonstream: dict[str, dict[int, list[WrkResult]]] = field(default_factory=dict)
    streaming: list[dict[str, object]] = field(default_factory=list)
    discovery: dict[str, object] = field(default_factory=dict)
    e2e: dict[str, object] = field(default_factory=dict)
    soak: dict[str, Any] = field(default_factory=dict)
    tls: dict[str, Any] = field(default_factory=dict)
    fleet: dict[str, Any] = field(default_factory=dict)
    routing: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, opts: Options, work: Path) -> None:
        self.o = opts
        self.work = work
        self.python = sys.executable
        self.script = write_script(work)
        self.r = Results()
        self._procs: list[Proc] = []

    def _keep(self, started: tuple[Proc, str]) -> tuple[Proc, str]:
        self._procs.append(started[0])
        return started

    def stop_all(self) -> None:
        while self._procs:
            self._procs.pop().stop()

    def _wrk(self, url: str, connections: int, key: str, pid: int | None = None) -> WrkResult:
        return run_wrk(
            url + CHAT_PATH, self.script, CHAT_REQUEST, connections, self.o.duration_s, key, pid=pid
        )

    def _warm(self, url: str, key: str) -> None:
        run_wrk(url + CHAT_PATH, self.script, CHAT_REQUEST, 16, 1, key)

    # -- case 1: non-streaming throughput and latency ------------------------------------------
    def nonstream(self) -> None:
        _, upstream = self._keep(start_nginx(self.work))
        say(f"nginx upstream at {upstream}")
        targets: dict[str, tuple[str, str, int | None]] = {"nginx direct": (upstream, "", None)}
        bare_proc, bare = self._keep(start_bare_relay(self.work, self.python, upstream))
        targets["bare relay"] = (bare, "", bare_proc.pid)
        gw_proc, gw = self._keep(
            start_rolemesh(self.work, self.python, "rolemesh", gateway_config(upstream), self.o.gateway_src)
        )
        targets["RoleMesh"] = (gw, CLIENT_KEY, gw_proc.pid)
        if self.o.compare_src is not None:
            cmp_proc, cmp = self._keep(
                start_rolemesh(
                    self.work, self.python, "rolemesh-compare", gateway_config(upstream), self.o.compare_src
                )
            )
            targets[COMPARE] = (cmp, CLIENT_KEY, cmp_proc.pid)
        self._matrix(targets)
        if self.o.litellm_venv is None:
            self.r.skipped["LiteLLM"] = self.o.litellm_skip_reason
            return
        say("starting LiteLLM (takes a few seconds)")
        ll, ll_url = start_litellm(self.work, self.o.litellm_venv, upstream)
        try:
            self._matrix({"LiteLLM": (ll_url, LITELLM_KEY, ll.pid)})
        finally:
            ll.stop()

    def _matrix(self, targets: dict[str, tuple[str, str, int | None]]) -> None:
        for name, (url, key, _) in targets.items():
            self._warm(url, key)
            self.r.nonstream[name] = {c: [] for c in CONNECTIONS}
        # Interleave reps across targets so that a noisy moment hurts all of them alike.
        for rep in range(self.o.reps):
            for name, (url, key, pid) in targets.items():
                for c in CONNECTIONS:
                    res = self._wrk(url, c, key, pid)
                    self.r.nonstream[name][c].append(res)
                    say(
                        f"rep {rep + 1} {name} c={c}: {res.rps:,.0f} req/s p50 {res.p50_ms:.3f} ms "
                        f"p99 {res.p99_ms:.3f} ms bad {res.bad}"
                    )

    # -- case 2: many slow streams through RoleMesh ---------------------------------------------
    def streaming(self) -> None:
        _, sse = self._keep(start_sse(self.work, self.python, self.o.chunks, self.o.chunk_interval_s))
        gw, url = start_rolemesh(
            self.work, self.python, "rolemesh-streams", gateway_config(sse), self.o.gateway_src
        )
        try:
            bare, bare_url = start_bare_relay(self.work, self.python, sse, "bare-relay-streams")
        except BaseException:
            gw.stop()
            raise
        targets = {"RoleMesh": (gw, url, CLIENT_KEY), "bare relay": (bare, bare_url, "")}
        if self.o.compare_src is not None:
            try:
                cmp, cmp_url = start_rolemesh(
                    self.work,
                    self.python,
                    "rolemesh-streams-compare",
                    gateway_config(sse),
                    self.o.compare_src,
                )
            except BaseException:
                gw.stop()
                bare.stop()
                raise
            targets[COMPARE] = (cmp, cmp_url, CLIENT_KEY)
        try:
            for rep in range(self.o.reps):
                for name, (proc, target_url, key) in targets.items():
                    result = self._streams(proc, target_url, key, rep)
                    result["target"] = name
                    self.r.streaming.append(result)
                    say(
                        f"rep {rep + 1} {name} streams: {result['completed']}/{result['streams']} completed, "
                        f"{result['errors']} errors {result['error_kinds'] or ''}, "
                        f"peak open {result['peak_open']}, {result['chunks_per_s']:,.0f} chunks/s, "
                        f"{result['cpu_us_per_chunk']:.0f} µs CPU/chunk, RSS {result['rss_mb']:.0f} MB"
                    )
        finally:
            for proc, _, _ in targets.values():
                proc.stop()

    def _streams(self, target: Proc, url: str, key: str, rep: int) -> dict[str, Any]:
        """One run of the stream client against ``url``, sampling the target's RSS and CPU."""
        timeout = self.o.chunks * self.o.chunk_interval_s * 4 + 30
        client = Proc(
            f"stream-client-{target.name}-{rep}",
            [
                self.python,
                "-m",
                "bench.streams",
                "--url",
                url + CHAT_PATH,
                "--streams",
                str(self.o.streams),
                "--chunks",
                str(self.o.chunks),
                "--timeout",
                str(timeout),
                "--key",
                key,
            ],
            self.work,
            cwd=str(REPO),
            stdout_pipe=True,
        )
        cpu0 = target.cpu_s()
        peak = target.rss_mb()
        deadline = time.monotonic() + timeout + 30
        try:
            while client.alive() and time.monotonic() < deadline:
                peak = max(peak, target.rss_mb())
                time.sleep(0.05)
            if client.alive():
                raise TimeoutError(f"stream client still running after {timeout + 30:g}s")
            assert client.popen.stdout is not None
            out = client.popen.stdout.read().decode()
        finally:
            client.stop()
        if client.popen.returncode != 0 or not out.strip():
            raise RuntimeError(f"stream client failed:\n{client.tail()}")
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        result["rss_mb"] = peak
        result["cpu_us_per_chunk"] = (target.cpu_s() - cpu0) * 1e6 / max(1, result["events"])
        return result

    # -- case 3: routing with a big fleet heartbeating ------------------------------------------
    def discovery(self) -> None:
        """Two gateways side by side, one with 1 node and one with the big fleet, both
        heartbeating; routed requests alternate between them run by run, so that the machine's
        noise hits both alike and only the fleet differs."""
        nginx_url = self._nginx_url()
        d = self.r.discovery
        d["direct"] = list(self.r.nonstream.get("nginx direct", {}).get(1, []))
        fleets = (("1 node", 1), (f"{self.o.nodes:,} nodes", self.o.nodes))
        # At least 7 runs each: the figure compared is a p50 at one connection, about 0.2 ms,
        # and the 10% asked for is 20 µs, the size of this machine's scheduling noise.
        reps = self.o.reps if self.o.quick else max(7, self.o.reps)
        measure_s = 2 * reps * (self.o.duration_s + 1.5) + 10
        gws: dict[str, tuple[Proc, str]] = {}
        sims: dict[str, Proc] = {}
        try:
            for i, (label, count) in enumerate(fleets):
                gws[label] = start_rolemesh(
                    self.work,
                    self.python,
                    f"rolemesh-discovery-{i}",
                    gateway_config(nginx_url),
                    self.o.gateway_src,
                )
                sims[label] = self._fleet(gws[label][1], count, nginx_url, measure_s, f"fleet-{count}")
                reg = self._registered(sims[label], count)
                d[f"{label} registration_s"] = reg["seconds"]
                say(f"{label}: registered in {reg['seconds']:.1f}s; heartbeating")
            # Heartbeats alone for a moment: each gateway's CPU per second with its fleet (with
            # 1 node that is the idle cost: probes, timers), hence the cost of a heartbeat.
            cpu0 = {label: gw.cpu_s() for label, (gw, _) in gws.items()}
            t0 = time.monotonic()
            time.sleep(2.0)
            for label, count in fleets:
                d[f"{label} gateway_cpu_per_s"] = (gws[label][0].cpu_s() - cpu0[label]) / (
                    time.monotonic() - t0
                )
                d[f"{label} beats_per_s"] = count / self.o.heartbeat_s
                self._warm_writer(gws[label][1])
                d[label] = []
            for rep in range(reps):
                for label, _ in fleets if rep % 2 == 0 else fleets[::-1]:  # neither always first
                    res = self._wrk_writer(gws[label][1])
                    d[label].append(res)
                    say(
                        f"rep {rep + 1} discovery {label}: p50 {res.p50_ms:.3f} ms p99 {res.p99_ms:.3f} ms "
                        f"{res.rps:,.0f} req/s bad {res.bad}"
                    )
            for label, sim in sims.items():
                sim.popen.send_signal(signal.SIGTERM)
                line = sim.readline(timeout_s=15)
                if line:
                    d[f"{label} heartbeats"] = json.loads(line)
            d["labels"] = [label for label, _ in fleets]
        finally:
            for sim in sims.values():
                sim.stop()
            for gw, _ in gws.values():
                gw.stop()

    def _fleet(self, url: str, count: int, nginx_url: str, duration_s: float, name: str) -> Proc:
        return Proc(
            name,
            [
                self.python,
                "-m",
                "bench.discovery",
                "--gateway",
                url,
                "--node-key",
                NODE_KEY,
                "--nodes",
                str(count),
                "--base-url",
                nginx_url,
                "--interval",
                str(self.o.heartbeat_s),
                "--duration",
                str(duration_s),
            ],
            self.work,
            cwd=str(REPO),
            stdout_pipe=True,
        )

    @staticmethod
    def _registered(sim: Proc, count: int) -> dict[str, Any]:
        """Wait for the simulator's first line (it prints it once every node is registered)."""
        line = sim.readline(timeout_s=120 + count / 100)
        if not line:
            raise RuntimeError(f"fleet simulator failed:\n{sim.tail()}")
        reg: dict[str, Any] = json.loads(line)
        if reg["failed"]:
            raise RuntimeError(f"{reg['failed']} of {count} registrations failed")
        return reg

    def _nginx_url(self) -> str:
        for p in self._procs:
            if p.name == "nginx":
                conf = (self.work / "nginx" / "nginx.conf").read_text()
                port = conf.split("listen 127.0.0.1:")[1].split()[0]
                return f"http://127.0.0.1:{port}"
        _, url = self._keep(start_nginx(self.work))
        return url

    def _wrk_writer(self, url: str, duration_s: float | None = None, connections: int = 1) -> WrkResult:
        body = CHAT_REQUEST.replace('"planner"', '"writer"')
        return run_wrk(
            url + CHAT_PATH, self.script, body, connections, duration_s or self.o.duration_s, CLIENT_KEY
        )

    def _warm_writer(self, url: str) -> None:
        self._wrk_writer(url, 1, 16)

    # -- case 4: real llama-server ----------------------------------------------------------------
    def llama(self) -> None:
        if not self.o.e2e:
            self.r.skipped["end-to-end"] = "skipped in --quick mode (needs a llama-server build)"
            return
        reason = e2e.missing()
        if reason:
            self.r.skipped["end-to-end"] = reason
            return
        # At least 5 runs here: a run is 15 s, and its ratio swings with the machine's noise.
        reps = self.o.reps if self.o.quick else max(5, self.o.reps)
        self.r.e2e = e2e.run(
            self.work, self.python, self.o.quick, reps, say, self.o.gateway_src, self.o.e2e_pin
        )

    # -- case 5 (on request only): the soak ----------------------------------------------------------
    def soak(self) -> None:
        self.r.soak = soak.SoakRun(self.work, self.python, self.o.soak_s, say, self.o.gateway_src).run()

    # -- case 6 (on request only): TLS between the client and the gateway ------------------------
    def tls(self) -> None:
        self.r.tls = tls.run(self.work, self.python, self.o.reps, self.o.duration_s, say, self.o.gateway_src)

    # -- on request only: cache-aware routing's cost and its effect on a fleet ---------------------
    def routing(self) -> None:
        self.r.routing = routing.run(self.o.quick)

    def fleet(self) -> None:
        o = self.o
        self.r.fleet = fleet.run(
            self.work,
            self.python,
            o.quick,
            say,
            o.gateway_src,
            o.fleet_nodes,
            o.fleet_conversations,
            o.fleet_turns,
            o.fleet_chart,
            o.fleet_cache_mib,
            o.fleet_reps,
        )

    def run(self) -> None:
        cases = [
            ("non-streaming", self.nonstream),
            ("streaming", self.streaming),
            ("discovery", self.discovery),
            ("end-to-end", self.llama),
            ("soak", self.soak),
            ("tls", self.tls),
            ("routing", self.routing),
            ("fleet", self.fleet),
        ]
        for name, case in cases:
            if name not in self.o.cases:
                continue
            say(f"case: {name}")
            try:
                case()
            except Exception as exc:  # one broken case must not hide the others' numbers
                self.r.failed[name] = f"{exc.__class__.__name__}: {exc}"
                say(f"case {name} FAILED:\n{traceback.format_exc()}")
        self.stop_all()


def _options(args: argparse.Namespace) -> Options:
    venv = Path(args.litellm_venv) if args.litellm_venv else None
    reason = ""
    if args.quick and not args.with_litellm:
        venv, reason = None, "skipped in --quick mode (installing LiteLLM takes minutes)"
    elif venv is None or not (venv / "bin" / "litellm").exists():
        venv, reason = None, "not installed (bench/run.sh installs it into its own venv)"
    if args.quick:
        return Options(True, 1, 1.0, 100, 20, 0.05, 1000, 10.0, venv, reason, args.with_e2e, args.keep)
    return Options(
        False,
        args.reps,
        args.duration,
        args.streams,
        50,
        0.05,
        args.nodes,
        10.0,
        venv,
        reason,
        True,
        args.keep,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/run.sh", description="RoleMesh benchmark suite")
    p.add_argument("--quick", action="store_true", help="CI smoke run: ~1 s per case, 1 rep, no LiteLLM")
    p.add_argument("--out", help="also write the Markdown report to this file")
    p.add_argument("--reps", type=int, default=3, help="repeats per measurement (medians are reported)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    p.add_argument("--streams", type=int, default=1000, help="concurrent streams")
    p.add_argument("--nodes", type=int, default=10_000, help="registered nodes for the discovery case")
    p.add_argument("--litellm-venv", default=os.environ.get("BENCH_LITELLM_VENV"))
    p.add_argument("--with-litellm", action="store_true", help="measure LiteLLM even with --quick")
    p.add_argument("--with-e2e", action="store_true", help="run the llama-server case even with --quick")
    p.add_argument("--keep", action="store_true", help="keep the work directory with all logs")
    p.add_argument(
        "--gateway-src", help="run the gateway and node agent from this source tree (A/B a change)"
    )
    p.add_argument(
        "--compare-src",
        help="also run a gateway from this tree, interleaved with the checkout's (non-streaming, streaming)",
    )
    p.add_argument(
        "--e2e-no-pin",
        action="store_true",
        help="end to end: let the scheduler place llama-server and the relays (default: pinned apart)",
    )
    p.add_argument(
        "--cases",
        default="non-streaming,streaming,discovery,end-to-end",
        help="comma-separated subset of: non-streaming, streaming, discovery, end-to-end; "
        "or soak, tls, routing, fleet (never run unless named here)",
    )
    p.add_argument("--fleet-nodes", type=int, default=2, help="fleet: node agents (default 2)")
    p.add_argument("--fleet-conversations", type=int, default=6, help="fleet: conversations at once")
    p.add_argument(
        "--fleet-cache-mib",
        type=int,
        default=None,
        help="fleet: each llama-server's prompt-cache RAM (--cache-ram, MiB; default: the agent's, 2048)",
    )
    p.add_argument("--fleet-turns", type=int, default=10, help="fleet: turns per conversation")
    p.add_argument("--fleet-reps", type=int, default=3, help="fleet: rounds (each runs every strategy)")
    p.add_argument(
        "--fleet-chart",
        default=str(REPO / "docs" / "fleet-ttft-by-turn.png"),
        help="fleet: where to draw the TTFT-by-turn chart (PNG)",
    )
    p.add_argument(
        "--soak-s", type=float, default=600.0, help="seconds of load in the soak case (default 600)"
    )
    args = p.parse_args(argv)
    opts = dataclasses.replace(
        _options(args),
        cases=tuple(c.strip() for c in args.cases.split(",")),
        gateway_src=Path(args.gateway_src).resolve() if args.gateway_src else None,
        compare_src=Path(args.compare_src).resolve() if args.compare_src else None,
        e2e_pin=not args.e2e_no_pin,
        soak_s=args.soak_s,
        fleet_nodes=args.fleet_nodes,
        fleet_conversations=args.fleet_conversations,
        fleet_turns=args.fleet_turns,
        fleet_chart=Path(args.fleet_chart).resolve() if args.fleet_chart else None,
        fleet_cache_mib=args.fleet_cache_mib,
        fleet_reps=args.fleet_reps,
    )
    work = Path(tempfile.mkdtemp(prefix="rolemesh-bench-"))
    bench = Bench(opts, work)
    started = time.monotonic()
    try:
        bench.run()
    finally:
        bench.stop_all()
    elapsed = time.monotonic() - started
    text = report.render(bench.r, opts, elapsed) if set(opts.cases) - ON_REQUEST else ""
    command = " ".join(["bash bench/run.sh", *(sys.argv[1:] if argv is None else argv)])
    if bench.r.soak:
        text += ("\n" if text else "") + soak.render(bench.r.soak, opts.soak_s, command)
    if bench.r.tls:
        text += ("\n" if text else "") + tls.render(bench.r.tls, command)
    if bench.r.routing:
        text += ("\n" if text else "") + routing.render(bench.r.routing)
    if bench.r.fleet:
        text += ("\n" if text else "") + fleet.render(bench.r.fleet, command)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    bad = report.request_errors(bench.r)
    if opts.keep or bench.r.failed or bad:
        say(f"logs kept in {work}")
    else:
        with contextlib.suppress(OSError):
            for f in sorted(work.rglob("*"), reverse=True):
                f.rmdir() if f.is_dir() else f.unlink()
            work.rmdir()
    if bench.r.failed:
        say(f"failed cases: {', '.join(bench.r.failed)}")
        return 1
    if bad:
        say(f"{bad} requests or streams failed under load")
        return 1
    if bench.r.soak and not bench.r.soak["ok"]:
        say("the soak's criteria do not hold (see its table)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
