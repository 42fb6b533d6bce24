"""Strategies choose among eligible nodes: exact rotation, randomness, least load."""

from __future__ import annotations

import random
from collections import Counter

from rolemesh_gateway.gateway.strategies import STRATEGIES, LeastBusy, Random, RoundRobin, make_strategy


def test_round_robin_is_exact_and_skips_ineligible() -> None:
    rr = RoundRobin()
    nodes = ["a", "b", "c"]
    assert [rr.choose(nodes, lambda n: True) for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    assert {rr.choose(nodes, lambda n: n != "b") for _ in range(6)} == {"a", "c"}
    assert rr.choose(nodes, lambda n: False) is None
    assert rr.choose([], lambda n: True) is None


def test_random_uses_every_eligible_node() -> None:
    r = Random(random.Random(1))
    counts = Counter(r.choose(["a", "b", "c"], lambda n: n != "c") for _ in range(200))
    assert set(counts) == {"a", "b"} and min(counts.values()) > 50
    assert r.choose(["a"] * 10 + ["z"], lambda n: n == "z") == "z"  # falls back to a scan
    assert r.choose(["a"], lambda n: False) is None


def test_least_busy_prefers_lowest_load() -> None:
    load = {"a": 0.9, "b": 0.1, "c": 0.5}
    lb = LeastBusy(lambda n: load[str(n)])
    assert lb.choose(["a", "b", "c"], lambda n: True) == "b"
    assert lb.choose(["a", "b", "c"], lambda n: n != "b") == "c"
    idle = LeastBusy(lambda n: 0.0)
    assert {idle.choose(["a", "b"], lambda n: True) for _ in range(4)} == {"a", "b"}


def test_registry_of_names_builds_each_strategy() -> None:
    assert set(STRATEGIES) == {"round_robin", "random", "least_busy", "cache_aware"}
    for name in STRATEGIES:
        assert make_strategy(name, lambda n: 0.0).choose(["x"], lambda n: True) == "x"
