"""Availability of ``type: proxy`` upstreams, from background probes and from real traffic."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from .errors import GatewayError
from .settings import ProxyModel, Settings
from .upstream import UpstreamClient

log = logging.getLogger("rolemesh.health")


@dataclass(slots=True)
class Health:
    available: bool = False
    reason: str = "not probed yet"
    checked_at: float = 0.0


class HealthMonitor:
    """Probes every proxy upstream's health path; traffic failures mark it down at once."""

    def __init__(self, settings: Settings, client: UpstreamClient) -> None:
        self._client = client
        self._timeout = settings.probes.timeout_s
        self._targets = {
            alias: f"{m.proxy_url}{m.health_path}"
            for alias, m in settings.models.items()
            if isinstance(m, ProxyModel)
        }
        self.state: dict[str, Health] = {alias: Health() for alias in self._targets}

    async def probe_all(self) -> None:
        await asyncio.gather(*(self._probe(alias) for alias in self._targets))

    async def _probe(self, alias: str) -> None:
        url = self._targets[alias]
        try:
            status = await self._client.get(url, self._timeout)
        except GatewayError as exc:
            self._set(alias, False, exc.message)
            return
        # Any answer below 500 means the server is up (a 404 just means it has no /health);
        # 5xx (llama-server says 503 while loading a model) means it cannot serve yet.
        if status < 500:
            self._set(alias, True, "ok")
        else:
            self._set(alias, False, f"health probe {url} answered HTTP {status}")

    def _set(self, alias: str, available: bool, reason: str) -> None:
        h = self.state[alias]
        if h.available != available:
            log.info("upstream %s is now %s (%s)", alias, "available" if available else "unavailable", reason)
        h.available, h.reason, h.checked_at = available, reason, time.time()

    def mark_failed(self, alias: str, reason: str) -> None:
        """Called when real traffic cannot connect: unavailable until the next good probe."""
        if alias in self.state:
            self._set(alias, False, reason)

    def is_available(self, alias: str) -> bool:
        return self.state[alias].available
