"""Exponential back-off: one small helper for every retry and poll loop of both programs."""

from __future__ import annotations


class Backoff:
    """Delays that double from ``initial`` up to ``cap``; :meth:`reset` after a success."""

    def __init__(self, initial: float, cap: float, factor: float = 2.0) -> None:
        self.initial = initial
        self.cap = cap
        self.factor = factor
        self._next = initial

    def next(self) -> float:
        """The delay to wait now; the one after it grows."""
        delay = min(self._next, self.cap)
        self._next = min(self._next * self.factor, self.cap)
        return delay

    def reset(self) -> None:
        self._next = self.initial
