"""Where nodes may point: ``nodes.allowed_networks`` and the addresses nodes may never use.

A node's ``base_url`` is where the gateway sends clients' prompts (and the node key). It is
checked when the node registers (its host's addresses, resolved then) and again on every new
connection (what the name resolves to now), so a name that moves cannot lead traffic outside
the allowed networks. Without ``nodes.allowed_networks``, anything is allowed but link-local
(cloud metadata services live there), unspecified and multicast addresses. The gateway's own
listening address is refused too: see :meth:`NodePolicy.check_registration`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from ..common.errors import BadRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_RESOLVE_TIMEOUT_S = 2.0


class NodePolicy:
    def __init__(self, allowed_networks: tuple[str, ...] | None) -> None:
        self._networks = (
            tuple(ipaddress.ip_network(n, strict=False) for n in allowed_networks)
            if allowed_networks is not None
            else None
        )

    def allows(self, address: str) -> bool:
        """May a node's URL lead to this IP address? (the connect-time check)"""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if self._networks is not None:
            return any(ip in net for net in self._networks)
        return not (ip.is_link_local or ip.is_unspecified or ip.is_multicast)

    async def check_registration(self, base_url: str, server: tuple[str, int] | None) -> None:
        """Refuse (400) a ``base_url`` outside the allowed networks or at this gateway itself."""
        parts = urlsplit(base_url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = await _resolve(host, port)
        if not addresses:
            raise BadRequest(
                f"invalid node registration: base_url: host '{host}' does not resolve", param="base_url"
            )
        refused = [a for a in addresses if not self.allows(a)]
        if refused:
            where = (
                "nodes.allowed_networks"
                if self._networks is not None
                else "link-local, unspecified or multicast"
            )
            raise BadRequest(
                f"invalid node registration: base_url: {host} is {', '.join(refused)}, which nodes may not "
                f"use ({where})",
                param="base_url",
            )
        if server is not None and port == server[1] and any(_same_host(a, server[0]) for a in addresses):
            raise BadRequest(
                "invalid node registration: base_url: that is this gateway's own address", param="base_url"
            )


def _same_host(address: str, own: str) -> bool:
    """Is ``address`` the gateway's own listening host (as the registering request reached it)?"""
    try:
        a, b = ipaddress.ip_address(address), ipaddress.ip_address(own)
    except ValueError:
        return False
    return a == b or (a.is_loopback and b.is_loopback)


async def _resolve(host: str, port: int) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(_RESOLVE_TIMEOUT_S):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError, UnicodeError):
        return []
    return sorted({str(info[4][0]) for info in infos})
