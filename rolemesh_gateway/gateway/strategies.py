"""Routing strategies, picked by name.

A strategy chooses one node out of the nodes that serve a role. It gets the role's current
node list (a tuple that only changes when membership changes) and a predicate that says
whether a node may take traffic now (fresh, not ejected, not already tried). Strategies scan
lazily from their starting point so that a request costs O(1) on a healthy fleet, even with
thousands of nodes per role.

:data:`STRATEGIES` is the one registry of names: config validation reads it, and
``rolemesh-gateway validate`` prints each alias's strategy with its description.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from .cache_aware import CacheAware, RoutingRequest

T = TypeVar("T")

#: How many random draws before falling back to a linear scan.
_RANDOM_DRAWS = 4


class Strategy(Protocol):
    """Chooses a node from ``nodes`` for which ``eligible`` holds, or ``None``.

    ``request`` is given only to a strategy whose ``needs_request`` is true (``cache_aware``):
    the others never pay for building it.
    """

    def choose(
        self, nodes: Sequence[T], eligible: Callable[[T], bool], request: RoutingRequest | None = None
    ) -> T | None: ...


class RoundRobin:
    """Exact rotation per alias: request *k* goes to node *k mod n* (skipping ineligible)."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(
        self, nodes: Sequence[T], eligible: Callable[[T], bool], request: RoutingRequest | None = None
    ) -> T | None:
        n = len(nodes)
        if n == 0:
            return None
        start = next(self._counter) % n
        for i in range(n):
            node = nodes[(start + i) % n]
            if eligible(node):
                return node
        return None


class Random:
    """Uniform random choice among eligible nodes."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(
        self, nodes: Sequence[T], eligible: Callable[[T], bool], request: RoutingRequest | None = None
    ) -> T | None:
        n = len(nodes)
        if n == 0:
            return None
        for _ in range(_RANDOM_DRAWS):
            node = nodes[self._rng.randrange(n)]
            if eligible(node):
                return node
        pool = [node for node in nodes if eligible(node)]
        return self._rng.choice(pool) if pool else None


class LeastBusy:
    """The eligible node with the lowest load (``load(node)``: in-flight / slots, lower is freer).

    Ties are broken by rotation so that idle nodes share traffic evenly.
    """

    def __init__(self, load: Callable[[object], float]) -> None:
        self._load = load
        self._counter = itertools.count()

    def choose(
        self, nodes: Sequence[T], eligible: Callable[[T], bool], request: RoutingRequest | None = None
    ) -> T | None:
        n = len(nodes)
        if n == 0:
            return None
        start = next(self._counter) % n
        best: T | None = None
        best_load = 0.0
        for i in range(n):
            node = nodes[(start + i) % n]
            if not eligible(node):
                continue
            load = self._load(node)
            if best is None or load < best_load:
                best, best_load = node, load
                if load <= 0.0:
                    break
        return best


StrategyFactory = Callable[[Callable[[object], float]], Strategy]

#: Strategy names accepted in ``models.<alias>.strategy``, with a one-line description each.
STRATEGIES: dict[str, tuple[StrategyFactory, str]] = {
    "round_robin": (lambda _load: RoundRobin(), "rotate through fresh nodes, exactly in turn"),
    "random": (lambda _load: Random(), "pick a fresh node uniformly at random"),
    "least_busy": (
        lambda load: LeastBusy(load),
        "pick the fresh node with the lowest load (in-flight / slots); queue when all are full",
    ),
    "cache_aware": (
        lambda load: CacheAware(load),
        "send a conversation back to the node that holds its prompt prefix (or its session), "
        "unless the load is out of balance; queue when all are full",
    ),
}

#: Strategies that queue a request when every node of the role is at capacity.
QUEUEING = frozenset({"least_busy", "cache_aware"})


def make_strategy(name: str, load: Callable[[object], float]) -> Strategy:
    """Build the strategy registered under ``name`` (validated in the settings already)."""
    factory, _description = STRATEGIES[name]
    return factory(load)
