"""Per-dependency state for dashboards and alerts, kept apart from readiness.

A process is ready when it can serve (a service: its database; the gateway:
its listeners and credential cache), never because everything it calls is up:
a readiness that follows a dependency turns one service's outage into every
replica's (issue 14: the gateway's /readyz answered 503 for 15 s while tiering
was down and 300 of 300 checkouts succeeded). What each dependency is doing is
still worth knowing: `DependencyWatch` probes each one periodically, keeps the
last answer (the gateway's /readyz/detail shows it, a service's health service
names it as `loyalty.dependency.<name>`), sets the `loyalty_dependency_up`
gauge and logs every change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime

from prometheus_client import REGISTRY, CollectorRegistry, Gauge

log = logging.getLogger(__name__)

# A probe answers a status name ("UP", "SERVING", ...) or raises (then "DOWN").
Probe = Callable[[], Awaitable[str]]
UP = "UP"
DOWN = "DOWN"
# Statuses that count as up on the gauge.
UP_STATUSES = frozenset({UP, "SERVING"})

_gauges: dict[int, Gauge] = {}


def _gauge(registry: CollectorRegistry) -> Gauge:
    """One gauge per registry (the default one is process-wide)."""
    key = id(registry)
    if key not in _gauges:
        _gauges[key] = Gauge(
            "loyalty_dependency_up",
            "1 when the dependency answered its last probe, else 0",
            ["dependency"],
            registry=registry,
        )
    return _gauges[key]


async def ping(action: Callable[[], Awaitable[object]]) -> str:
    await action()
    return UP


class DependencyWatch:
    def __init__(
        self,
        probes: Mapping[str, Probe],
        interval_seconds: float,
        timeout_seconds: float = 2.0,
        registry: CollectorRegistry = REGISTRY,
        on_change: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> None:
        self._probes = dict(probes)
        self._interval = interval_seconds
        self._timeout = timeout_seconds
        self._gauge = _gauge(registry)
        self._on_change = on_change
        self.states: dict[str, str] = {}
        self.checked_at: datetime | None = None

    async def _one(self, name: str, probe: Probe) -> str:
        try:
            async with asyncio.timeout(self._timeout):
                return await probe()
        except Exception as exc:
            log.debug("dependency %s probe failed: %r", name, exc)
            return DOWN

    async def check(self) -> dict[str, str]:
        """Probe every dependency once, concurrently; the new states."""
        names = list(self._probes)
        results = await asyncio.gather(*(self._one(n, self._probes[n]) for n in names))
        for name, state in zip(names, results, strict=True):
            before = self.states.get(name)
            self.states[name] = state
            self._gauge.labels(name).set(1 if state in UP_STATUSES else 0)
            if before != state:
                if before is not None or state not in UP_STATUSES:
                    log.warning("dependency %s: %s -> %s", name, before or "unknown", state)
                if self._on_change is not None:
                    await self._on_change(name, state)
        self.checked_at = datetime.now(UTC)
        return dict(self.states)

    async def run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self._interval)
