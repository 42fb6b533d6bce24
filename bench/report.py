"""Turn raw runs into the Markdown report: medians, ratios, and the issue's targets."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .harness import Options, Results
    from .wrk import WrkResult

TARGET_ORDER = ("nginx direct", "bare relay", "RoleMesh", "RoleMesh (compare-src)", "LiteLLM")


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _rps(runs: list[WrkResult]) -> float:
    return med([r.rps for r in runs])


def _p50(runs: list[WrkResult]) -> float:
    return med([r.p50_ms for r in runs])


def _p99(runs: list[WrkResult]) -> float:
    return med([r.p99_ms for r in runs])


def _bad(runs: list[WrkResult]) -> int:
    return sum(r.bad for r in runs)


def _cpu(runs: list[WrkResult]) -> str:
    values = [r.cpu_us for r in runs if r.cpu_us is not None]
    return f"{med(values):,.0f}" if values else "-"


def _ms(x: float) -> str:
    return "n/a" if x != x else f"{x:.3f}"


def _x(x: float) -> str:
    return "n/a" if x != x else f"{x:,.2f}x"


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    return (
        f"{os.cpu_count()} cores ({cpu}){mem}, Linux {platform.release()}, Python {platform.python_version()}"
    )


def request_errors(r: Results) -> int:
    """Failed requests/streams of our own targets (LiteLLM's are its own business)."""
    n = sum(_bad(runs) for name, by_c in r.nonstream.items() if name != "LiteLLM" for runs in by_c.values())
    n += sum(int(s["errors"]) for s in r.streaming)
    for key, value in r.discovery.items():
        if key not in ("direct", "labels") and isinstance(value, list):
            n += _bad(value)
        elif key.endswith(" heartbeats") and isinstance(value, dict):
            n += int(value.get("bad", 0)) + int(value.get("error", 0))
    if r.e2e:
        n += sum(r.e2e["errors"].values())  # type: ignore[attr-defined]
    return n


def render(r: Results, o: Options, elapsed_s: float) -> str:
    out: list[str] = []
    mode = "quick smoke run (indicative only)" if o.quick else "full run"
    out.append(f"## RoleMesh benchmark, {time.strftime('%Y-%m-%d %H:%M')} ({mode})\n")
    out.append(f"Machine: {machine()}. ")
    out.append(
        f"Each figure is the median of {o.reps} run(s) of {o.duration_s:g} s; wrk with keep-alive "
        f"connections POSTing a chat completion; every target relays to the same nginx (1 worker) "
        f"that returns a fixed chat completion. Single process each. Took {elapsed_s:.0f} s.\n"
    )
    if o.gateway_src is not None:
        out.append(f"RoleMesh ran from the source tree `{o.gateway_src}`, not this checkout.\n")
    if o.compare_src is not None:
        out.append(f"`RoleMesh (compare-src)` ran from `{o.compare_src}`, interleaved with RoleMesh.\n")
    for name, why in r.skipped.items():
        out.append(f"- **{name}**: {why}")
    for name, why in r.failed.items():
        out.append(f"- **{name} FAILED**: {why.splitlines()[0]} (details in the log on stderr)")
    if r.skipped or r.failed:
        out.append("")
    out += _nonstream(r)
    out += _streaming(r, o)
    out += _discovery(r)
    out += _e2e(r)
    out += _targets(r, o)
    return "\n".join(out)


def _nonstream(r: Results) -> list[str]:
    if not r.nonstream:
        return []
    out = [
        "### Non-streaming: POST /v1/chat/completions\n",
        "| target | req/s c=1 | req/s c=16 | req/s c=64 | p50 c=1 (ms) | p99 c=1 (ms) "
        "| p50 c=64 (ms) | p99 c=64 (ms) | CPU µs/req c=64 | non-2xx + socket errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in TARGET_ORDER:
        by_c = r.nonstream.get(name)
        if not by_c:
            continue
        bad = sum(_bad(v) for v in by_c.values())
        out.append(
            f"| {name} | {_rps(by_c[1]):,.0f} | {_rps(by_c[16]):,.0f} | {_rps(by_c[64]):,.0f} "
            f"| {_ms(_p50(by_c[1]))} | {_ms(_p99(by_c[1]))} | {_ms(_p50(by_c[64]))} | {_ms(_p99(by_c[64]))} "
            f"| {_cpu(by_c[64])} | {bad} |"
        )
    out.append("")
    rows = _ratios(r)
    if rows:
        out += ["| side by side | value |", "| --- | ---: |", *[f"| {k} | {v} |" for k, v in rows], ""]
    return out


def _ratios(r: Results) -> list[tuple[str, str]]:
    ns = r.nonstream
    rows: list[tuple[str, str]] = []
    rm = ns.get("RoleMesh")
    if not rm:
        return rows
    for other in ("LiteLLM", "bare relay"):
        if other in ns:
            for c in (64, 16, 1):
                rows.append((f"RoleMesh / {other}, req/s at c={c}", _x(_rps(rm[c]) / _rps(ns[other][c]))))
    cmp = ns.get("RoleMesh (compare-src)")
    if cmp:
        for c in (64, 16, 1):
            rows.append(
                (f"RoleMesh (compare-src) / RoleMesh, req/s at c={c}", _x(_rps(cmp[c]) / _rps(rm[c])))
            )
        rows.append(
            (
                "RoleMesh (compare-src) / RoleMesh, CPU per request at c=64",
                f"{_cpu(cmp[64])} / {_cpu(rm[64])} µs",
            )
        )
    direct = ns.get("nginx direct")
    if direct:
        for name in ("bare relay", "RoleMesh", "RoleMesh (compare-src)", "LiteLLM"):
            if name in ns:
                rows.append(
                    (f"{name}: added p50 over direct, c=1", f"{_ms(_p50(ns[name][1]) - _p50(direct[1]))} ms")
                )
                rows.append(
                    (f"{name}: added p99 over direct, c=1", f"{_ms(_p99(ns[name][1]) - _p99(direct[1]))} ms")
                )
    return rows


def _streaming(r: Results, o: Options) -> list[str]:
    if not r.streaming:
        return []
    ideal = o.streams * o.chunks / (o.chunks * o.chunk_interval_s)
    out = [
        f"### Streaming: {o.streams:,} concurrent streams, {o.chunks} SSE chunks "
        f"{o.chunk_interval_s * 1000:g} ms apart (upstream: a small uvloop SSE server)\n",
        "| target | completed | errors | peak held open | chunks/s relayed (no delay: "
        f"{ideal:,.0f}) | stream time p50 / max (s) | CPU µs/chunk | RSS peak (MB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in TARGET_ORDER:
        s = [x for x in r.streaming if x.get("target", "RoleMesh") == name]
        if not s:
            continue
        out.append(
            f"| {name} | {med([x['completed'] for x in s]):,.0f} / {o.streams:,} "
            f"| {sum(int(x['errors']) for x in s)} | {med([x['peak_open'] for x in s]):,.0f} "
            f"| {med([x['chunks_per_s'] for x in s]):,.0f} "
            f"| {med([x['p50_stream_s'] for x in s]):.2f} / {max(x['max_stream_s'] for x in s):.2f} "
            f"| {med([x['cpu_us_per_chunk'] for x in s]):,.0f} | {max(x['rss_mb'] for x in s):.0f} |"
        )
    out.append("")
    return out


def _discovery(r: Results) -> list[str]:
    d: dict[str, Any] = r.discovery
    labels = d.get("labels")
    if not labels:
        return []
    direct = _p50(d.get("direct") or [])
    out = [
        "### Discovery at scale: routed requests (c=1) to a `discovered` alias "
        "while the fleet heartbeats every 10 s\n",
        "| fleet | registration (s) | heartbeats/s answered (failed) | gateway CPU µs/heartbeat | p50 (ms) "
        "| added p50 over direct (ms) | p99 (ms) | req/s | non-2xx |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label in labels:
        runs = d[label]
        hb = d.get(f"{label} heartbeats", {})
        out.append(
            f"| {label} | {d[f'{label} registration_s']:.1f} "
            f"| {hb.get('per_s', 0):,.0f} ({hb.get('bad', 0) + hb.get('error', 0)}) "
            f"| {_cpu_beat(d, label)} | {_ms(_p50(runs))} "
            f"| {_ms(_p50(runs) - direct)} | {_ms(_p99(runs))} | {_rps(runs):,.0f} | {_bad(runs)} |"
        )
    out.append("")
    return out


def _cpu_beat(d: dict[str, Any], label: str) -> str:
    """Gateway CPU per heartbeat: CPU/s with the fleet minus CPU/s with one node, per beat."""
    first = d["labels"][0]
    busy, idle = d.get(f"{label} gateway_cpu_per_s"), d.get(f"{first} gateway_cpu_per_s")
    if label == first or busy is None or idle is None:
        return "-"
    return f"{max(0.0, busy - idle) * 1e6 / d[f'{label} beats_per_s']:,.0f}"


def _e2e(r: Results) -> list[str]:
    e: dict[str, Any] = r.e2e
    if not e:
        return []
    out = [
        f"### End to end: real llama-server, tiny model, {e['max_tokens']} tokens per request, "
        f"{e['requests']} sequential requests per path and run, alternating between the paths; "
        f"medians of {len(e['ratio_plain_reps'])} runs; {e['placement']}\n",
        "| path | streaming: tokens/s, first to last token | streaming: time to first token (ms) "
        "| streaming: tokens/s, whole request | non-streaming: tokens/s | failed requests |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label in e["paths"]:
        x = e[label]
        failed = e["errors"].get(label, 0)
        out.append(
            f"| {label} | {x['decode']:,.0f} | {x['first_ms']:.1f} | {x['stream']:,.0f} "
            f"| {x['plain']:,.0f} | {failed} |"
        )
    cpu = e.get("gateway CPU us/token")
    if cpu:
        out.append(
            f"| gateway CPU per relayed token (µs) | {cpu['stream']:,.0f} | | | {cpu['plain']:,.1f} | |"
        )
    out.append(
        f"| gateway + node agent / direct (median of the runs' ratios) | {e['ratio_decode'] * 100:.1f}% "
        f"| +{e['added_first_ms']:.2f} ms | {e['ratio_stream'] * 100:.1f}% "
        f"| {e['ratio_plain'] * 100:.1f}% | |"
    )
    out.append("")
    names = {"decode": "streaming, first to last token", "stream": "streaming, whole request"}
    for mode in ("decode", "stream", "plain"):
        runs = ", ".join(f"{x * 100:.1f}%" for x in e[f"ratio_{mode}_reps"])
        out.append(
            f"Gateway + node agent / direct, {names.get(mode, 'non-streaming')}, run by run: {runs}.  "
        )
    out.append("")
    return out


def _targets(r: Results, o: Options) -> list[str]:
    ns, rows = r.nonstream, []

    def row(n: str, what: str, measured: str, ok: bool | None) -> None:
        rows.append(f"| {n} | {what} | {measured} | {'n/a' if ok is None else ('yes' if ok else 'NO')} |")

    rm, ll, bare, direct = (ns.get(k) for k in ("RoleMesh", "LiteLLM", "bare relay", "nginx direct"))
    if rm:
        vs_ll = _rps(rm[64]) / _rps(ll[64]) if ll else float("nan")
        vs_bare = _rps(rm[64]) / _rps(bare[64]) if bare else float("nan")
        bad = sum(_bad(v) for v in rm.values())
        row(
            "1",
            "c=64: >= 30x LiteLLM, >= 0.6x bare relay, zero non-2xx",
            f"{_x(vs_ll)} LiteLLM, {_x(vs_bare)} bare, {bad} bad",
            None if not ll or not bare else (vs_ll >= 30 and vs_bare >= 0.6 and bad == 0),
        )
        if direct:
            a50 = _p50(rm[1]) - _p50(direct[1])
            a99 = _p99(rm[1]) - _p99(direct[1])
            row(
                "2",
                "added latency c=1: p50 <= 0.3 ms, p99 <= 1 ms",
                f"p50 +{_ms(a50)} ms, p99 +{_ms(a99)} ms",
                a50 <= 0.3 and a99 <= 1.0,
            )
    rm_streams = [x for x in r.streaming if x.get("target", "RoleMesh") == "RoleMesh"]
    if rm_streams:
        errors = sum(int(x["errors"]) for x in rm_streams)
        rss = max(x["rss_mb"] for x in rm_streams)
        done = min(x["completed"] for x in rm_streams)
        row(
            "3",
            "1,000 concurrent streams, zero errors, RSS < 300 MB",
            f"{o.streams:,} streams: {done:,} completed (worst run), {errors} errors, {rss:.0f} MB",
            None if o.streams < 1000 else (errors == 0 and rss < 300 and done == o.streams),
        )
    if r.e2e:
        ratio = r.e2e["ratio"]
        got = (
            f"streaming {r.e2e['ratio_decode'] * 100:.1f}% (first to last token; first token "
            f"+{r.e2e['added_first_ms']:.2f} ms), non-streaming {r.e2e['ratio_plain'] * 100:.1f}%"
        )
        row("4", "tokens/s through gateway + agent >= 98% of direct", got, None if o.quick else ratio >= 0.98)
    d: dict[str, Any] = r.discovery
    if d.get("labels") and d.get("direct"):
        direct50 = _p50(d["direct"])
        one, many = (_p50(d[label]) - direct50 for label in d["labels"])
        ratio = many / one if one > 0 else float("nan")
        row(
            "5",
            "10,000 nodes heartbeating: added p50 within 10% of 1 node",
            f"{d['labels'][1]}: +{_ms(many)} ms vs +{_ms(one)} ms ({ratio * 100:.0f}%)",
            None if o.nodes < 10_000 else ratio <= 1.10,
        )
    if not rows:
        return []
    return [
        "### Targets (issue 5)\n",
        "| # | target | measured | holds |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
    ]
