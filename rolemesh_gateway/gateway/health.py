"""Availability of ``type: proxy`` upstreams, from background probes and from real traffic."""

from __future__ import annotations

import asyncio
import logging

from ..common.http1 import Client
from ..common.probe import probe
from .settings import ProxyModel, Settings

log = logging.getLogger("rolemesh.health")


class HealthMonitor:
    """Probes every proxy upstream's health path; traffic that cannot connect marks it down at once."""

    def __init__(self, settings: Settings, client: Client) -> None:
        self._client = client
        self._timeout = settings.probes.timeout_s
        self._targets = {
            alias: f"{m.proxy_url}{m.health_path}"
            for alias, m in settings.models.items()
            if isinstance(m, ProxyModel)
        }
        self._state: dict[str, tuple[bool, str]] = dict.fromkeys(self._targets, (False, "not probed yet"))

    def status(self, alias: str) -> tuple[bool, str]:
        """``(available, reason)`` of a proxy alias as last seen."""
        return self._state[alias]

    async def probe_all(self) -> None:
        await asyncio.gather(*(self._probe(alias) for alias in self._targets))

    async def _probe(self, alias: str) -> None:
        up, reason, _ = await probe(self._client, self._targets[alias], self._timeout)
        self._set(alias, up, reason)

    def _set(self, alias: str, available: bool, reason: str) -> None:
        if self._state[alias][0] != available:
            log.info("upstream %s is now %s (%s)", alias, "available" if available else "unavailable", reason)
        self._state[alias] = (available, reason)

    def mark_failed(self, alias: str, reason: str) -> None:
        """Called when real traffic cannot connect: unavailable until the next good probe."""
        if alias in self._state:
            self._set(alias, False, reason)
