"""API keys: matching by stable key id, bearer parsing, and where each kind of key is looked for."""

from __future__ import annotations

import pytest

from rolemesh_gateway.common.auth import KeyRing, bearer, key_id
from rolemesh_gateway.common.errors import Unauthorized
from rolemesh_gateway.common.protocol import NODE_KEY

ALPHA = "alpha-secret-key-0001"
BETA = "beta-secret-key-0002"


def test_key_id_is_stable_short_and_does_not_reveal_the_key() -> None:
    kid = key_id(ALPHA)
    assert kid == key_id(ALPHA) and kid != key_id(BETA)
    assert kid.startswith("key-") and len(kid) == len("key-") + 8
    assert int(kid.removeprefix("key-"), 16) >= 0  # hex digits
    assert ALPHA not in kid and "alpha" not in kid


def test_match_reports_the_key_id_whatever_the_order_of_the_ring() -> None:
    one, other = KeyRing([ALPHA, BETA]), KeyRing([BETA, ALPHA])
    for ring in (one, other):
        assert ring.match(ALPHA.encode()) == key_id(ALPHA)
        assert ring.match(BETA.encode()) == key_id(BETA)
    assert one.key(key_id(BETA)) == BETA.encode()
    assert one.key(key_id("rotated-out")) is None


@pytest.mark.parametrize(
    "presented",
    [None, b"", ALPHA.encode()[:-1], ALPHA.encode() + b"x", ALPHA.upper().encode(), b" " + ALPHA.encode()],
)
def test_anything_but_the_exact_key_does_not_match(presented: bytes | None) -> None:
    assert KeyRing([ALPHA, BETA]).match(presented) is None


def test_empty_ring_matches_nothing_and_is_false() -> None:
    ring = KeyRing([])
    assert not ring and len(ring) == 0
    assert ring.match(b"") is None and ring.match(b"anything") is None
    assert KeyRing([ALPHA]) and len(KeyRing([ALPHA, BETA])) == 2


@pytest.mark.parametrize(
    ("value", "token"),
    [
        (b"Bearer abc", b"abc"),
        (b"bearer abc", b"abc"),
        (b"BEARER abc", b"abc"),
        (b"Bearer   abc  ", b"abc"),
        (b"Basic YWJj", None),
        (b"Bearerabc", None),
        (b"abc", None),
        (b"", None),
    ],
)
def test_bearer_token_parsing(value: bytes, token: bytes | None) -> None:
    assert bearer(value) == token


def test_check_client_accepts_x_api_key_or_bearer() -> None:
    ring = KeyRing([ALPHA, BETA])
    assert ring.check_client([(b"x-api-key", ALPHA.encode())]) == key_id(ALPHA)
    assert ring.check_client([(b"authorization", b"Bearer " + BETA.encode())]) == key_id(BETA)
    assert ring.check_client([(b"authorization", b"bearer " + BETA.encode())]) == key_id(BETA)


def test_check_client_accepts_any_valid_credential() -> None:
    ring = KeyRing([ALPHA, BETA])
    both = [(b"authorization", b"Bearer " + BETA.encode()), (b"x-api-key", ALPHA.encode())]
    assert ring.check_client(both) in (key_id(ALPHA), key_id(BETA))
    # A wrong or empty X-Api-Key does not spoil a good bearer token (SDKs send both).
    good_bearer = (b"authorization", b"Bearer " + ALPHA.encode())
    assert ring.check_client([(b"x-api-key", b"wrong"), good_bearer]) == key_id(ALPHA)
    assert ring.check_client([(b"x-api-key", b""), good_bearer]) == key_id(ALPHA)
    # Nor the reverse.
    assert ring.check_client([(b"authorization", b"Bearer nope"), (b"x-api-key", BETA.encode())]) == key_id(
        BETA
    )
    with pytest.raises(Unauthorized, match="invalid API key"):
        ring.check_client([(b"x-api-key", b"wrong"), (b"authorization", b"Bearer nope")])
    with pytest.raises(Unauthorized, match="missing API key"):  # empty headers count as absent
        ring.check_client([(b"x-api-key", b" "), (b"authorization", b"Bearer ")])


def test_check_client_says_missing_or_invalid() -> None:
    ring = KeyRing([ALPHA])
    with pytest.raises(Unauthorized, match="missing API key: send it as 'X-Api-Key") as info:
        ring.check_client([(b"content-type", b"application/json")])
    assert info.value.status == 401 and info.value.code == "invalid_api_key"
    with pytest.raises(Unauthorized, match="missing API key"):
        ring.check_client([(b"authorization", b"Basic " + ALPHA.encode())])  # not a bearer token
    with pytest.raises(Unauthorized, match=r"^invalid API key$"):
        ring.check_client([(b"x-api-key", b"nope")])


def test_check_node_reads_the_node_key_header_only_unless_bearer_too() -> None:
    ring = KeyRing([ALPHA])
    assert ring.check_node([(NODE_KEY, ALPHA.encode())]) == key_id(ALPHA)
    assert ring.check_node([(NODE_KEY, b"wrong")]) is None
    assert ring.check_node([]) is None
    as_bearer = [(b"authorization", b"Bearer " + ALPHA.encode())]
    assert ring.check_node(as_bearer) is None
    assert ring.check_node(as_bearer, bearer_too=True) == key_id(ALPHA)
    assert ring.check_node([(b"x-api-key", ALPHA.encode())], bearer_too=True) is None


def test_check_node_header_wins_over_bearer() -> None:
    ring = KeyRing([ALPHA])
    headers = [(b"authorization", b"Bearer " + ALPHA.encode()), (NODE_KEY, b"wrong")]
    assert ring.check_node(headers, bearer_too=True) is None
    headers = [(b"authorization", b"Bearer wrong"), (NODE_KEY, ALPHA.encode())]
    assert ring.check_node(headers, bearer_too=True) == key_id(ALPHA)


def test_node_key_header_name_on_the_wire() -> None:
    assert NODE_KEY == b"x-rolemesh-node-key"
