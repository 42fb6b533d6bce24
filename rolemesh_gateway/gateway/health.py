"""Availability of ``type: proxy`` upstreams, from background probes and from real traffic.

When an upstream becomes available, its ``/v1/models`` is asked once what it says about its
model (llama-server's ``meta``: training context, parameter count...), so the gateway's own
``/v1/models`` can show it without a call per listing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..common.config import bearer_header
from ..common.http1 import Client
from ..common.probe import fetch_model_info, probe
from .settings import ProxyModel, Settings

log = logging.getLogger("rolemesh.health")


class HealthMonitor:
    """Probes every proxy upstream's health path; traffic that cannot connect marks it down at once."""

    def __init__(self, settings: Settings, client: Client, previous: HealthMonitor | None = None) -> None:
        self._client = client
        self._timeout = settings.probes.timeout_s
        self._proxies = {alias: m for alias, m in settings.models.items() if isinstance(m, ProxyModel)}
        self._state: dict[str, tuple[bool, str]] = dict.fromkeys(self._proxies, (False, "not probed yet"))
        self._info: dict[str, dict[str, Any] | None] = dict.fromkeys(self._proxies)
        if previous is not None:  # a config reload: what is known of an unchanged upstream stays
            for alias, m in self._proxies.items():
                old = previous._proxies.get(alias)
                if old is not None and (old.proxy_url, old.health_path, old.api_key) == (
                    m.proxy_url,
                    m.health_path,
                    m.api_key,
                ):
                    self._state[alias] = previous._state[alias]
                    self._info[alias] = previous._info[alias]

    def status(self, alias: str) -> tuple[bool, str]:
        """``(available, reason)`` of a proxy alias as last seen."""
        return self._state[alias]

    def model_info(self, alias: str) -> dict[str, Any] | None:
        return self._info.get(alias)

    async def probe_all(self) -> None:
        await asyncio.gather(*(self._probe(alias) for alias in self._proxies))

    async def _probe(self, alias: str) -> None:
        m = self._proxies[alias]
        headers = bearer_header(m.api_key)
        up, reason, _ = await probe(
            self._client, f"{m.proxy_url}{m.health_path}", self._timeout, headers=headers
        )
        self._set(alias, up, reason)
        if up and self._info[alias] is None:
            self._info[alias] = await fetch_model_info(
                self._client, m.proxy_url, self._timeout, headers, m.upstream_model
            )

    def _set(self, alias: str, available: bool, reason: str) -> None:
        if self._state[alias][0] != available:
            log.info("upstream %s is now %s (%s)", alias, "available" if available else "unavailable", reason)
        self._state[alias] = (available, reason)

    def mark_failed(self, alias: str, reason: str) -> None:
        """Called when real traffic cannot connect: unavailable until the next good probe."""
        if alias in self._state:
            self._set(alias, False, reason)
