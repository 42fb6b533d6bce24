"""API keys: one :class:`KeyRing` per kind of key, used by the gateway and by the node agent.

A ring is built once from validated settings (keys are printable ASCII, checked there), so the
bytes compared on every request are computed once. A presented key is compared against every
key of the ring in constant time, and the match is reported by a stable *key id* (a short hash
of the key), never by its position in the config list: reordering or rotating keys in the file,
or two gateways that list them in another order, never changes which node used which key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from .asgi import Headers
from .config import NamedKey
from .errors import Unauthorized
from .protocol import NODE_KEY


def key_id(key: str) -> str:
    """A stable, non-secret name for a key: ``key-`` and 8 hex digits of its SHA-256."""
    return "key-" + hashlib.sha256(key.encode("ascii")).hexdigest()[:8]


def bearer(value: bytes) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` value; None for other schemes."""
    if value[:7].lower() == b"bearer ":
        return value[7:].strip()
    return None


def entries(keys: Iterable[str | NamedKey]) -> list[tuple[str, str]]:
    """``(name, key)`` of config key entries; a plain string is named after its hash."""
    return [(k.name, k.key) if isinstance(k, NamedKey) else (key_id(k), k) for k in keys]


class KeyRing:
    """A set of keys of one kind (client keys, node keys, admin keys)."""

    def __init__(self, keys: Iterable[str | NamedKey]) -> None:
        named = entries(keys)
        self._keys = tuple((k.encode("ascii"), key_id(k)) for _, k in named)
        self._by_id = {kid: raw for raw, kid in self._keys}
        self._names = {key_id(k): name for name, k in named}

    def name(self, kid: str | None) -> str:
        """The name of a key id (for metrics and logs): its configured name, or the id itself."""
        if kid is None:
            return "anonymous"
        return self._names.get(kid, kid)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def match(self, presented: bytes | None) -> str | None:
        """The id of the key presented, compared in constant time against every key; else None."""
        found = None
        if presented is None:
            return None
        for raw, kid in self._keys:
            if hmac.compare_digest(presented, raw):
                found = kid
        return found

    def key(self, kid: str) -> bytes | None:
        """The key bytes with this id (what the gateway sends to a node), if it is still here."""
        return self._by_id.get(kid)

    def check_client(self, headers: Headers) -> str:
        """The id of a valid client key in ``X-Api-Key`` or ``Authorization: Bearer``; else 401.

        Any one valid credential is enough (a client may send both headers, one of them stale
        or empty); an empty header counts as absent.
        """
        presented: list[bytes] = []
        for k, v in headers:
            if k == b"x-api-key":
                token: bytes | None = v.strip()
            elif k == b"authorization":
                token = bearer(v)
            else:
                continue
            if token:
                presented.append(token)
        for token in presented:
            kid = self.match(token)
            if kid is not None:
                return kid
        raise Unauthorized(
            "invalid API key"
            if presented
            else "missing API key: send it as 'X-Api-Key: <key>' or 'Authorization: Bearer <key>'"
        )

    def check_node(self, headers: Headers, *, bearer_too: bool = False) -> str | None:
        """The id of the node key in ``X-RoleMesh-Node-Key`` (or a bearer token); None if absent."""
        presented = None
        for k, v in headers:
            if k == NODE_KEY:
                presented = v
                break
            if bearer_too and k == b"authorization" and presented is None:
                presented = bearer(v)
        return self.match(presented)
