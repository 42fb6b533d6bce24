"""Back-off delays: doubling from the first delay up to the cap, and back to the start on reset."""

from __future__ import annotations

from rolemesh_gateway.common.backoff import Backoff


def test_delays_double_up_to_the_cap_and_stay_there() -> None:
    b = Backoff(0.5, 5.0)
    assert [b.next() for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_reset_starts_over() -> None:
    b = Backoff(1.0, 60.0)
    for _ in range(4):
        b.next()
    b.reset()
    assert [b.next() for _ in range(3)] == [1.0, 2.0, 4.0]


def test_first_delay_never_exceeds_the_cap() -> None:
    b = Backoff(10.0, 2.0)
    assert [b.next() for _ in range(3)] == [2.0, 2.0, 2.0]


def test_other_factor() -> None:
    b = Backoff(1.0, 100.0, factor=3.0)
    assert [b.next() for _ in range(5)] == [1.0, 3.0, 9.0, 27.0, 81.0]
