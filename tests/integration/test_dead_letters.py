"""servicekit/deadletters.py on real Redis (one Redis, then a Redis Cluster)
and PostgreSQL: a real consumer dead-letters an event, the operators' list
finds it across producers and groups, and a redrive re-publishes it so the
group that failed applies it once while another group of the same stream,
which applied it the first time, skips it; a second redrive finds nothing."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from loyalty.events.v1 import events_pb2
from servicekit.consumer import EventConsumer, Subscription
from servicekit.db import Database, UnitOfWork
from servicekit.deadletters import list_dead_letters, redrive, redrive_audit_stream
from servicekit.errors import InvalidArgument, NotFound
from servicekit.events import ReceivedEvent, dead_letter_stream, stream_name
from servicekit.redis_client import RedisClient

from ..harness import Infra, eventually
from .test_events import MAX_ATTEMPTS, db, names, processed, running, xadd

__all__ = ["db", "names"]  # fixtures, used by name (redis: conftest.py)


async def test_a_dead_letter_is_listed_and_redriven_once_to_the_group_that_failed(
    db: Database, redis: RedisClient, infra: Infra, names: tuple[str, str]
) -> None:
    producer, group = names
    other = f"{group}-other"
    stream = stream_name(infra.namespace, producer)
    calls: Counter[tuple[str, str]] = Counter()
    broken = True

    def handler_of(name: str, fails: bool):  # type: ignore[no-untyped-def]
        async def handler(uow: UnitOfWork, event: ReceivedEvent) -> None:
            calls[(name, event.payload.order_id)] += 1  # type: ignore[attr-defined]
            if fails and broken:
                raise RuntimeError("ledger says no")

        return handler

    def consumer(name: str, fails: bool) -> EventConsumer:
        return EventConsumer(
            name,
            db,
            redis,
            infra.namespace,
            [Subscription(producer, events_pb2.OrderCompleted, handler_of(name, fails))],
            max_attempts=MAX_ATTEMPTS,
            retry_after_ms=100,
            block_ms=50,
        )

    entry, event_id = await xadd(redis, stream, producer, events_pb2.OrderCompleted(order_id="o1"))
    dlq = dead_letter_stream(infra.namespace, producer, group)
    failing, healthy = consumer(group, True), consumer(other, False)
    async with running(failing), running(healthy):
        await eventually(lambda: redis.xrange(dlq), timeout=10)
        await eventually(lambda: calls[(other, "o1")] == 1)

        listed = [d for d in await list_dead_letters(redis, infra.namespace) if d.stream == stream]
        assert len(listed) == 1
        letter = listed[0]
        assert (letter.group, letter.event_id, letter.attempts) == (group, event_id, MAX_ATTEMPTS)
        assert letter.event_type == "loyalty.events.v1.OrderCompleted"
        assert "ledger says no" in letter.error
        assert event_id not in await processed(db, group)

        broken = False  # the cause is fixed; the operator redrives
        done = await redrive(redis, infra.namespace, stream, group, letter.entry_id, "ops/li.wei")
        assert done.dead_letter.event_id == event_id and done.published_id > entry
        await eventually(lambda: calls[(group, "o1")] == MAX_ATTEMPTS + 1, timeout=10)
        await eventually(lambda: _processed_has(db, group, event_id), timeout=10)
        await asyncio.sleep(0.5)  # time for any second delivery to show
    # Applied once by the group that failed; the other group skipped the re-publish.
    assert calls == Counter({(group, "o1"): MAX_ATTEMPTS + 1, (other, "o1"): 1})
    assert await redis.xlen(dlq) == 0
    audit = await redis.xrange(redrive_audit_stream(stream))
    assert [(f[b"operator"], f[b"group"], f[b"event_id"]) for _, f in audit] == [
        (b"ops/li.wei", group.encode(), event_id.encode())
    ]
    assert not [d for d in await list_dead_letters(redis, infra.namespace) if d.stream == stream]
    # Redriven already: nothing to redrive, nothing published again.
    length = await redis.xlen(stream)
    with pytest.raises(NotFound) as gone:
        await redrive(redis, infra.namespace, stream, group, letter.entry_id, "ops/li.wei")
    assert gone.value.code == "UNKNOWN_DEAD_LETTER"
    assert await redis.xlen(stream) == length


async def _processed_has(db: Database, group: str, event_id: str) -> bool:
    return event_id in await processed(db, group)


@pytest.mark.parametrize(
    ("stream", "group", "entry_id", "field"),
    [
        ("other:events:rewards", "tiering", "1-0", "stream"),
        ("{ns}:events:Rewards!", "tiering", "1-0", "stream"),
        ("{ns}:events:rewards", "", "1-0", "group"),
        ("{ns}:events:rewards", "tiering", "1733300000000", "id"),
    ],
)
async def test_a_malformed_reference_is_refused_naming_its_part(
    redis: RedisClient, infra: Infra, stream: str, group: str, entry_id: str, field: str
) -> None:
    with pytest.raises(InvalidArgument) as bad:
        await redrive(
            redis, infra.namespace, stream.replace("{ns}", infra.namespace), group, entry_id, "x"
        )
    assert (bad.value.code, bad.value.field) == ("INVALID_DEAD_LETTER_REF", field)
