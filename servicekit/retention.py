"""Bookkeeping that must not grow forever: rows past their retention are
deleted in small batches by a background task of every service.

Every service keeps `processed_events` (one row per consumed event: the
consumers' dedup). A redelivery comes within minutes (an entry left pending
by a crash, the relay publishing twice), so rows older than
PROCESSED_EVENTS_RETENTION_HOURS (7 days) only cost space; a consumer group
that lags further than that never processed those events, so nothing is
applied twice. A service adds its own tables (guides: callback_signatures).
A table partitioned by time is not pruned here but by dropping whole
partitions (servicekit/partitions.py `drop_after`, ServiceApp.partition): the
ctid batches below are wrong on it (a ctid is unique per partition only).

Batches are short transactions that lock only the rows they delete; replicas
skip each other's rows (SKIP LOCKED) instead of queueing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

log = logging.getLogger(__name__)

BATCH_ROWS = 5_000


@dataclass(frozen=True)
class Retention:
    table: str  # schema-qualified, e.g. "rewards.processed_events"
    column: str  # a timestamptz column, indexed
    keep: timedelta
    # Extra SQL condition on the rows to delete (the outbox keeps its newest row).
    where: str = ""


class Pruner:
    def __init__(
        self,
        pool: asyncpg.Pool,
        retentions: list[Retention],
        interval_seconds: float,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        batch_rows: int = BATCH_ROWS,
    ) -> None:
        self._pool = pool
        self._retentions = retentions
        self._interval = interval_seconds
        self._clock = clock
        self._batch = batch_rows

    async def prune_once(self) -> dict[str, int]:
        """Delete every row past its retention; rows deleted per table."""
        deleted: dict[str, int] = {}
        for r in self._retentions:
            if await self._pool.fetchval(
                "SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass($1)", r.table
            ):
                # Deleting by ctid would hit rows of other partitions sharing it.
                log.error("%s is partitioned: not pruned here (drop its partitions)", r.table)
                deleted[r.table] = 0
                continue
            cutoff = self._clock() - r.keep
            total = 0
            while True:
                status = await self._pool.execute(
                    f"DELETE FROM {r.table} WHERE ctid = ANY(ARRAY("
                    f"SELECT ctid FROM {r.table} WHERE {r.column} < $1"
                    + (f" AND ({r.where})" if r.where else "")
                    + " LIMIT $2 FOR UPDATE SKIP LOCKED))",
                    cutoff,
                    self._batch,
                )
                n = int(status.split()[-1])
                total += n
                if n < self._batch:
                    break
            deleted[r.table] = total
        return deleted

    async def run(self) -> None:
        while True:
            try:
                deleted = await self.prune_once()
                if any(deleted.values()):
                    log.info("pruned rows past retention: %s", deleted)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Postgres away, say: the next round tries again; nothing is lost.
                log.exception("pruning failed; retrying in %.0fs", self._interval)
            await asyncio.sleep(self._interval)
