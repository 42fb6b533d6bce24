"""The ``cache_aware`` strategy: send each conversation back to the node that still holds it.

llama-server keeps each slot's prompt in its KV cache (and idle slots in host RAM) and reuses
the longest common prefix, so a request that lands on the node that served the previous turn
of its conversation skips most of its prompt processing; one that lands elsewhere pays for the
whole prompt again. This strategy remembers, per role, which node has seen which prompt prefix:

* **An approximate prefix map.** The request's text (chat messages in order, or the prompt) is
  cut into blocks of ``block_chars`` characters; block *i*'s key is the hash of block *i*
  chained with the key of block *i-1*, so one key stands for a whole prefix. The map goes from
  key to the nodes that served that prefix; it is bounded to ``max_entries`` keys, least
  recently used first out (a prompt's first blocks are touched last, so a conversation loses
  its tail before its shared head). A node that leaves the role is forgotten.
* **Routing** (after SGLang's router): when the load is out of balance (the busiest eligible
  node has ``balance_abs`` more requests in flight than the idlest *and* more than
  ``balance_rel`` times as many), the least loaded node. Otherwise the node with the longest
  matching prefix if the match covers at least ``match_threshold`` of the prompt, else the
  least loaded node.
* **Sessions.** A request with an explicit session key (``X-Session-Id``, or the body's
  ``user``) is pinned by consistent hashing (a ring with virtual nodes, stable across
  gateways).
* **Bounded load.** Neither a prefix match nor a session may put more than ``load_factor``
  times the average in-flight count on one node (``ceil(load_factor * (in flight + 1) /
  nodes)``): the next best match, or the next node on the ring, takes the request. Without it
  a long system prompt shared by every conversation would draw each new conversation to the
  first node that served it (SGLang leans on its balance thresholds, which a small fleet of
  single-slot CPU servers never reaches).

What is learnt comes from the node that actually answered (after a failover, the second node),
and only from answers that were not errors. The cost is a few hash and dict operations per
block (about 64 for an 8 KB prompt), well under the 50 microseconds the bench allows.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

#: Points per node on the session ring: enough for an even share with a handful of nodes.
VIRTUAL_NODES = 64
#: The session header (lower case, as in ASGI scopes).
SESSION_HEADER = b"x-session-id"
#: A session key longer than this is cut (it is only hashed).
MAX_SESSION_KEY = 256


@dataclass(frozen=True, slots=True)
class CacheAwareConfig:
    """Thresholds of :class:`CacheAware`; ``models.<alias>.cache_aware`` in the config."""

    match_threshold: float = 0.5
    balance_abs: int = 32
    balance_rel: float = 1.1
    max_entries: int = 65536
    block_chars: int = 128
    load_factor: float = 1.25


@dataclass(slots=True)
class RoutingRequest:
    """What ``cache_aware`` knows of a request: its prefix blocks and its session key."""

    #: ``(chained key, characters covered up to the end of this block)``, in prompt order.
    blocks: list[tuple[int, int]]
    #: The prompt's length in characters.
    chars: int
    session: str | None = None


def prompt_text(data: dict[str, Any]) -> str:
    """The text of a request in the order the model reads it (chat messages, or the prompt).

    Not what the chat template renders, but a prefix of one request's text is a prefix of the
    next turn's, which is all the map needs.
    """
    parts: list[str] = []
    for key in ("system", "instructions"):  # Anthropic Messages, OpenAI Responses
        if key in data:
            parts.append(_text(data[key]))
    messages = data.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict):
                parts.append(f"{m.get('role')}\x1f{_text(m.get('content'))}\x1e")
            else:
                parts.append(_text(m))
    for key in ("prompt", "input"):  # completions, infill, Responses
        if key in data:
            parts.append(_text(data[key]))
    return "".join(parts)


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\x1d".join(
            v["text"] if isinstance(v, dict) and isinstance(v.get("text"), str) else _text(v) for v in value
        )
    return repr(value) if value is not None else ""


def routing_request(
    data: dict[str, Any] | None, headers: Sequence[tuple[bytes, bytes]], block_chars: int
) -> RoutingRequest:
    """Build the :class:`RoutingRequest` of one request (only for ``cache_aware`` aliases)."""
    session: str | None = None
    for k, v in headers:
        if k == SESSION_HEADER:
            session = v[:MAX_SESSION_KEY].decode("latin-1")
            break
    if data is None:
        return RoutingRequest([], 0, session)
    if session is None:
        user = data.get("user")
        if isinstance(user, str) and user:
            session = user[:MAX_SESSION_KEY]
    text = prompt_text(data)
    blocks: list[tuple[int, int]] = []
    key = 0
    n = len(text)
    for start in range(0, n, block_chars):
        key = hash((key, text[start : start + block_chars]))
        blocks.append((key, min(start + block_chars, n)))
    return RoutingRequest(blocks, n, session)


def _stable_hash(value: str) -> int:
    """A hash every gateway computes alike (Python's ``hash`` of a str is salted per process)."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "big")


class CacheAware:
    """The ``cache_aware`` strategy (see the module docstring); one per role."""

    needs_request = True

    def __init__(
        self,
        load: Callable[[Any], float],
        config: CacheAwareConfig | None = None,
        *,
        inflight: Callable[[Any], int] | None = None,
        name: Callable[[Any], str] = str,
    ) -> None:
        self.config = config or CacheAwareConfig()
        self._load = load
        self._inflight = inflight or (lambda n: int(load(n)))
        self._name = name
        #: Chained block key -> the nodes that served that prefix (a dict used as an ordered set).
        self._map: collections.OrderedDict[int, dict[Any, None]] = collections.OrderedDict()
        self._members: Sequence[Any] = ()
        self._ring: list[tuple[int, int]] = []  # (point, index into _members)
        self._counter = itertools.count()
        #: Why the last :meth:`choose` picked its node: ``prefix`` or ``session`` (the node holds
        #: the conversation), ``balance`` or ``least_loaded``. Read right after the call.
        self.reason = ""

    def __len__(self) -> int:
        """How many prefix keys the map holds (at most ``max_entries``)."""
        return len(self._map)

    # -- learning ---------------------------------------------------------------------------
    def learn(self, node: object, request: RoutingRequest) -> None:
        """``node`` served ``request``: it now holds its prefix (from the last block back, so
        the head of a prompt is the most recently used and the last evicted)."""
        table = self._map
        for key, _end in reversed(request.blocks):
            entry = table.get(key)
            if entry is None:
                table[key] = {node: None}
            else:
                entry[node] = None
                table.move_to_end(key)
        over = len(table) - self.config.max_entries
        for _ in range(over):
            table.popitem(last=False)

    def forget(self, gone: set[Any] | frozenset[Any]) -> None:
        """Drop nodes that left the role from every entry (an entry left empty goes)."""
        if not gone:
            return
        for key in list(self._map):
            entry = self._map[key]
            for node in gone & entry.keys():
                del entry[node]
            if not entry:
                del self._map[key]

    def _membership(self, nodes: Sequence[Any]) -> None:
        """The role's node list changed (registry tuples only change then): forget the nodes
        that left, rebuild the session ring."""
        if self._members:
            self.forget(set(self._members) - set(nodes))
        self._members = nodes
        ring = [
            (_stable_hash(f"{self._name(node)}#{v}"), i)
            for i, node in enumerate(nodes)
            for v in range(VIRTUAL_NODES)
        ]
        ring.sort()
        self._ring = ring

    # -- choosing ---------------------------------------------------------------------------
    def choose(
        self, nodes: Sequence[T], eligible: Callable[[T], bool], request: RoutingRequest | None = None
    ) -> T | None:
        if nodes is not self._members:
            self._membership(nodes)
        candidates = [n for n in nodes if eligible(n)]
        if not candidates:
            return None
        cfg = self.config
        counts = [self._inflight(n) for n in candidates]
        most, least = max(counts), min(counts)
        if most - least > cfg.balance_abs and most > cfg.balance_rel * least:
            self.reason = "balance"
            return self._least_loaded(candidates)
        if request is not None:
            bound = math.ceil(cfg.load_factor * (sum(counts) + 1) / len(candidates))
            if request.session is not None:
                pinned = self._pinned(request.session, candidates, bound)
                if pinned is not None:
                    self.reason = "session"
                    return pinned
            best = self._best_match(request, eligible, bound)
            if best is not None:
                self.reason = "prefix"
                return best
        self.reason = "least_loaded"
        return self._least_loaded(candidates)

    def _best_match(self, request: RoutingRequest, eligible: Callable[[T], bool], bound: int) -> T | None:
        """The eligible node with the longest prefix of ``request`` (if it covers enough) and
        fewer than ``bound`` requests in flight."""
        if not request.chars:
            return None
        table = self._map
        found: list[tuple[dict[Any, None], int]] = []
        for key, end in request.blocks:
            entry = table.get(key)
            if entry is None:
                break
            found.append((entry, end))
        need = self.config.match_threshold * request.chars
        for entry, end in reversed(found):  # deepest first; shallower ones only if none can take it
            if end < need:
                return None
            nodes: list[T] = [n for n in entry if eligible(n) and self._inflight(n) < bound]
            if nodes:
                return nodes[0] if len(nodes) == 1 else self._least_loaded(nodes)
        return None

    def _pinned(self, session: str, candidates: list[T], bound: int) -> T | None:
        """The session's node on the ring, passing over nodes at the load bound."""
        ring = self._ring
        if not ring:
            return None
        allowed = set(candidates)
        members = self._members
        start = bisect.bisect_left(ring, (_stable_hash(session), -1))
        seen: set[int] = set()
        for step in range(len(ring)):
            index = ring[(start + step) % len(ring)][1]
            if index in seen:
                continue
            seen.add(index)
            node: T = members[index]
            if node in allowed and self._inflight(node) < bound:
                return node
            if len(seen) == len(members):
                break
        return None

    def _least_loaded(self, candidates: list[T]) -> T:
        """Lowest ``load``; ties broken by rotation so that idle nodes share the work."""
        n = len(candidates)
        start = next(self._counter) % n
        best = candidates[start]
        best_load = self._load(best)
        for i in range(1, n):
            node = candidates[(start + i) % n]
            load = self._load(node)
            if load < best_load:
                best, best_load = node, load
        return best
