"""Outbox relay: moves committed events from a service's outbox table to its
Redis stream.

At-least-once: an event is deleted from the outbox only after XADD succeeded,
in the same transaction that locked it, so a crash in between publishes it
again and consumers drop the duplicate by event id. Several replicas can run
the relay at once: rows are claimed with FOR UPDATE SKIP LOCKED.
"""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis

from .db import Database
from .events import ENVELOPE_FIELD

log = logging.getLogger(__name__)

# Streams are trimmed approximately to this many entries; consumers keep up
# long before that, and the dead-letter streams keep what failed.
STREAM_MAX_LEN = 1_000_000


class OutboxRelay:
    def __init__(
        self,
        db: Database,
        redis: Redis,
        stream: str,
        batch_size: int = 500,
        poll_interval: float = 1.0,
    ) -> None:
        self._db = db
        self._redis = redis
        self._stream = stream
        self._batch_size = batch_size
        self._poll_interval = poll_interval

    async def publish_pending(self) -> int:
        """Publish one batch; returns how many events went out."""
        async with self._db.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                f"SELECT id, envelope FROM {self._db.schema}.outbox"
                " ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                self._batch_size,
            )
            if not rows:
                return 0
            async with self._redis.pipeline(transaction=False) as pipe:
                for row in rows:
                    pipe.xadd(
                        self._stream,
                        {ENVELOPE_FIELD: bytes(row["envelope"])},
                        maxlen=STREAM_MAX_LEN,
                        approximate=True,
                    )
                await pipe.execute()
            await conn.execute(
                f"DELETE FROM {self._db.schema}.outbox WHERE id = ANY($1::bigint[])",
                [row["id"] for row in rows],
            )
            return len(rows)

    async def run(self) -> None:
        wakeup = self._db.outbox_wakeup
        while True:
            # Cleared before publishing: a commit landing meanwhile sets it again,
            # so the wait below returns at once instead of sleeping on it.
            wakeup.clear()
            try:
                while await self.publish_pending() == self._batch_size:
                    pass
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox relay failed; retrying")
                await asyncio.sleep(self._poll_interval)
            try:
                await asyncio.wait_for(wakeup.wait(), timeout=self._poll_interval)
            except TimeoutError:
                pass
