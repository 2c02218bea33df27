"""Delivers the durable reward requests journeys write (issue a coupon, award
points) to the rewards service, once each: a lease per attempt, the request
key as rewards' idempotency key, exponential backoff on transient failures."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

from servicekit.db import Database

from . import scheduler_repository as scheduler_repo
from .channels import as_delivery, backoff, poll_forever
from .domain import Clock
from .ports import RewardsPort

log = logging.getLogger(__name__)


class RewardDispatcher:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        port: RewardsPort,
        batch_size: int = 100,
        lease: timedelta = timedelta(seconds=60),
        max_attempts: int = 8,
        retry_base: timedelta = timedelta(seconds=5),
        retry_cap: timedelta = timedelta(minutes=10),
    ) -> None:
        self._db = db
        self._clock = clock
        self._port = port
        self._batch = batch_size
        self._lease = lease
        self._max_attempts = max_attempts
        self._retry_base = retry_base
        self._retry_cap = retry_cap

    async def dispatch_once(self) -> int:
        now = self._clock.now()
        async with self._db.unit_of_work() as uow:
            rows = await scheduler_repo.lease_reward_requests(
                uow.conn, now, now + self._lease, self._batch
            )
        if not rows:
            return 0
        outcomes = await asyncio.gather(
            *(self._port.fulfil(r) for r in rows), return_exceptions=True
        )
        done = self._clock.now()
        results: list[tuple[str, str, str, datetime | None]] = []
        for row, raised_or_done in zip(rows, outcomes, strict=True):
            outcome = as_delivery(raised_or_done)
            if outcome.status == "delivered":
                results.append((row.request_key, "done", outcome.provider_ref, None))
            elif outcome.status == "retry" and row.attempts < self._max_attempts:
                nxt = done + backoff(row.attempts, self._retry_base, self._retry_cap)
                results.append((row.request_key, "pending", outcome.reason, nxt))
            else:
                log.warning("reward request %s failed: %s", row.request_key, outcome.reason)
                results.append((row.request_key, "failed", outcome.reason, None))
        async with self._db.unit_of_work() as uow:
            await scheduler_repo.record_reward_results(uow.conn, results)
        return len(rows)

    async def run(self, poll_interval: float) -> None:
        await poll_forever(self.dispatch_once, poll_interval, log, "reward dispatcher")
