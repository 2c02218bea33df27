"""`python -m services.<name> events status`: where this service's events are.

As producer: the last sequence number published, events not yet published,
events kept for replays and the oldest kept. As consumer, per consumer group
and producer: the cursor (highest contiguous sequence applied), the
producer's last published sequence as Redis knows it, the lag between them,
gaps found and healed, and an open gap's first missing number.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from .consumer import CursorStatus
from .db import Database, create_pool
from .events import head_key, stream_name
from .outbox import OutboxRelay, OutboxStatus
from .redis_client import create_redis
from .settings import ServiceSettings


@dataclass(frozen=True)
class EventsStatus:
    producer: str
    outbox: OutboxStatus
    cursors: list[CursorStatus]

    def render(self) -> str:
        o = self.outbox
        lines = [
            f"producer {self.producer}: last published seq {o.last_published},"
            f" unpublished {o.unpublished}, kept {o.kept} (oldest seq {o.floor})",
            "",
            f"{'consumer':<28} {'producer':<12} {'applied':>9} {'published':>9}"
            f" {'lag':>7} {'gaps found':>10} {'healed':>7}  open gap from",
        ]
        for c in self.cursors:
            lines.append(
                f"{c.consumer:<28} {c.producer:<12} {c.applied:>9} {c.published:>9}"
                f" {c.lag:>7} {c.gaps_found:>10} {c.gaps_healed:>7}"
                f"  {c.replay_from if c.replay_from is not None else '-'}"
            )
        if not self.cursors:
            lines.append("(no consumer of this service has run yet)")
        return "\n".join(lines)


async def events_status(
    name: str, settings: ServiceSettings, schema: str | None = None
) -> EventsStatus:
    schema = schema or name
    pool = await create_pool(settings.database_url, 0, 2)
    redis = create_redis(settings.redis_url)
    try:
        db = Database(pool, schema, name)
        relay = OutboxRelay(db, redis, stream_name(settings.redis_namespace, name))
        outbox = await relay.status()
        rows = await pool.fetch(
            "SELECT consumer, producer, applied_seq, replay_from, gaps_found, gaps_healed"
            f" FROM {schema}.event_cursors ORDER BY consumer, producer"
        )
        cursors = []
        for row in rows:
            stream = stream_name(settings.redis_namespace, row["producer"])
            try:
                raw = await redis.hget(head_key(stream), b"head")
            except Exception:  # Redis away: the head is unknown, the rest still shows
                raw = None
            cursors.append(
                CursorStatus(
                    row["consumer"],
                    row["producer"],
                    row["applied_seq"],
                    int(raw) if raw else 0,
                    row["replay_from"],
                    row["gaps_found"],
                    row["gaps_healed"],
                )
            )
        return EventsStatus(name, outbox, cursors)
    finally:
        await redis.aclose()
        await pool.close()


def print_events_status(name: str, settings: ServiceSettings) -> None:
    print(asyncio.run(events_status(name, settings)).render())
