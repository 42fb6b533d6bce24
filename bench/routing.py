"""The ``routing`` case: what ``cache_aware`` adds to a request's CPU, against round robin.

Measured in-process on what the route does per request: round robin is ``choose``; cache_aware
is building the request's prefix blocks (:func:`routing_request`), ``choose`` with a warm map
(every conversation's earlier turns learnt, 1,000 conversations on 3 nodes, so lookups hit a
map of realistic size), and ``learn`` after the answer. The chat body is 8 KB of JSON
(a system prompt and an 11-message history). The issue's bound: at most 50 microseconds more.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

from rolemesh_gateway.gateway.cache_aware import CacheAware, routing_request
from rolemesh_gateway.gateway.strategies import RoundRobin

LIMIT_US = 50.0
WORDS = [
    "plan",
    "write",
    "check",
    "tool",
    "result",
    "value",
    "alpha",
    "beta",
    "gamma",
    "delta",
    "order",
    "report",
    "invoice",
    "customer",
    "shipment",
    "status",
    "error",
    "retry",
    "budget",
    "schedule",
    "owner",
    "review",
    "draft",
    "summary",
    "table",
    "column",
]


def words(rng: random.Random, n: int) -> str:
    """``n`` words of agent-ish filler text (tokenizes to about 1.15 tokens a word)."""
    return " ".join(rng.choice(WORDS) for _ in range(n))


def chat_body(rng: random.Random, system: str, turns: int) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}]
    for i in range(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": words(rng, 100)})
    return {"model": "planner", "messages": messages, "max_tokens": 16}


class _Node:
    __slots__ = ("inflight", "node_id")

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.inflight = 0

    def load(self) -> float:
        return self.inflight / 4


def _per_call_us(fn: Any, n: int, reps: int = 5) -> float:
    """Median over ``reps`` of the CPU time per call (process time: other processes don't count)."""
    runs = []
    for _ in range(reps):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        runs.append((time.process_time() - t0) / n * 1e6)
    return statistics.median(runs)


def run(quick: bool = False) -> dict[str, Any]:
    rng = random.Random(7)
    nodes = tuple(_Node(f"node-{i}") for i in range(3))
    system = words(rng, 260)
    body = chat_body(rng, system, 11)
    import orjson

    size = len(orjson.dumps(body))
    headers = [(b"content-type", b"application/json"), (b"x-request-id", b"r-1")]

    def anyone(_n: object) -> bool:
        return True

    rr = RoundRobin()
    ca = CacheAware(_Node.load, inflight=lambda n: n.inflight, name=lambda n: n.node_id)
    for c in range(200 if quick else 1000):  # a warm map: many conversations' prefixes
        other = chat_body(random.Random(c), system, 6)
        ca.learn(nodes[c % 3], routing_request(other, headers, 128))
    request = routing_request(body, headers, 128)
    ca.learn(nodes[1], request)

    def round_robin() -> None:
        rr.choose(nodes, anyone)

    def cache_aware() -> None:
        req = routing_request(body, headers, 128)
        node = ca.choose(nodes, anyone, req)
        ca.learn(node, req)

    n = 2000 if quick else 20000
    base = _per_call_us(round_robin, n)
    cost = _per_call_us(cache_aware, n)
    return {
        "body_bytes": size,
        "blocks": len(request.blocks),
        "map_entries": len(ca),
        "round_robin_us": base,
        "cache_aware_us": cost,
        "added_us": cost - base,
        "limit_us": LIMIT_US,
        "ok": cost - base <= LIMIT_US,
    }


def render(r: dict[str, Any]) -> str:
    verdict = "met" if r["ok"] else "NOT met"
    return "\n".join(
        [
            "## Routing cost: cache_aware vs round_robin (`--cases routing`)",
            "",
            f"A chat request of {r['body_bytes']:,} bytes of JSON ({r['blocks']} prefix blocks), "
            f"a prefix map warm with {r['map_entries']:,} entries, 3 nodes; CPU time per request, "
            "median of 5 runs.",
            "",
            "| strategy | CPU per request (us) |",
            "|---|---:|",
            f"| round_robin (`choose`) | {r['round_robin_us']:.2f} |",
            f"| cache_aware (build prefix blocks, `choose`, `learn`) | {r['cache_aware_us']:.2f} |",
            f"| **added by cache_aware** | **{r['added_us']:.2f}** "
            f"(target <= {r['limit_us']:.0f}: {verdict}) |",
            "",
        ]
    )


if __name__ == "__main__":
    print(render(run()))
