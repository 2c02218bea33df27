"""The event bus itself (servicekit.consumer and servicekit.outbox) on real Redis
and PostgreSQL: poison events, unknown event types, and a relay crash between
XADD and the outbox delete.

Consumers here are standalone EventConsumer instances recording into the
tiering schema's processed_events, each with its own producer stream and group,
so they never see the running services' events (nor those services theirs).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest
from google.protobuf.message import Message
from redis.asyncio.cluster import RedisCluster

from loyalty.events.v1 import events_pb2
from servicekit.consumer import EventConsumer, Subscription
from servicekit.db import Database, UnitOfWork, create_pool
from servicekit.events import (
    ENVELOPE_FIELD,
    SEQ_FIELD,
    ReceivedEvent,
    dead_letter_stream,
    make_envelope,
    stream_name,
)
from servicekit.outbox import OutboxRelay
from servicekit.redis_client import RedisClient, slot_of

from ..harness import Infra, eventually

MAX_ATTEMPTS = 3


@pytest.fixture
async def db(infra: Infra) -> AsyncIterator[Database]:
    pool = await create_pool(infra.database_url, 1, 5)
    database = Database(pool, "tiering", "kit-test")
    yield database
    await database.close()


@pytest.fixture
def names() -> tuple[str, str]:
    """A producer and a consumer group of this test alone."""
    tag = uuid.uuid4().hex[:8]
    return f"kit-{tag}", f"group-{tag}"


@contextlib.asynccontextmanager
async def running(consumer: EventConsumer) -> AsyncIterator[None]:
    task = asyncio.create_task(consumer.run(), name=f"test-{consumer.group}")
    try:
        yield
    finally:
        # As ServiceApp.stop does: a cancel alone can be lost inside redis-py's
        # XREADGROUP (the loop then ran on and this await hung the suite).
        consumer.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=10)


def consumer_for(
    group: str,
    db: Database,
    redis: RedisClient,
    infra: Infra,
    producer: str,
    handler: Callable[[UnitOfWork, ReceivedEvent], Awaitable[None]],
) -> EventConsumer:
    return EventConsumer(
        group,
        db,
        redis,
        infra.namespace,
        [Subscription(producer, events_pb2.OrderCompleted, handler)],
        max_attempts=MAX_ATTEMPTS,
        retry_after_ms=100,
        block_ms=50,
    )


async def xadd(redis: RedisClient, stream: str, producer: str, payload: Message) -> tuple[str, str]:
    """Publish like the relay does; returns (entry id, event id)."""
    envelope = make_envelope(producer, payload, str(uuid.uuid4()))
    entry = await redis.xadd(stream, {ENVELOPE_FIELD: envelope.SerializeToString()})
    return entry.decode(), envelope.event_id


async def pending_count(redis: RedisClient, stream: str, group: str) -> int:
    return int((await redis.xpending(stream, group))["pending"])


async def processed(db: Database, group: str) -> set[str]:
    rows = await db.pool.fetch(
        "SELECT event_id FROM tiering.processed_events WHERE consumer = $1", group
    )
    return {str(r["event_id"]) for r in rows}


async def test_poison_event_is_dead_lettered_and_the_next_event_still_flows(
    db: Database, redis: RedisClient, infra: Infra, names: tuple[str, str]
) -> None:
    producer, group = names
    stream = stream_name(infra.namespace, producer)
    calls: Counter[str] = Counter()

    async def handler(uow: UnitOfWork, event: ReceivedEvent) -> None:
        order_id = event.payload.order_id  # type: ignore[attr-defined]
        calls[order_id] += 1
        if order_id == "poison":
            raise RuntimeError("cannot fold order poison: ledger says no")

    poison_entry, poison_event = await xadd(
        redis, stream, producer, events_pb2.OrderCompleted(order_id="poison")
    )
    _, good_event = await xadd(redis, stream, producer, events_pb2.OrderCompleted(order_id="good"))
    dlq = dead_letter_stream(infra.namespace, producer, group)

    async with running(consumer_for(group, db, redis, infra, producer, handler)):
        entries = await eventually(lambda: redis.xrange(dlq), timeout=10)
        await eventually(lambda: calls["good"] >= 1)
        # Parked for good: further retry rounds do not touch it again.
        await asyncio.sleep(0.5)

    assert len(entries) == 1
    fields = entries[0][1]
    assert b"cannot fold order poison: ledger says no" in fields[b"error"]
    assert int(fields[b"attempts"]) == MAX_ATTEMPTS
    assert fields[b"source_id"].decode() == poison_entry
    assert fields[b"source_stream"].decode() == stream
    parked = events_pb2.EventEnvelope()
    parked.ParseFromString(fields[ENVELOPE_FIELD])
    assert parked.event_id == poison_event
    # Read together first (one transaction, rolled back when the poison
    # failed, "good" run in it if it came first), then one by one; then each
    # retry of the poison alone. Only the commit counts: "good" once, below.
    assert calls["poison"] == MAX_ATTEMPTS + 1
    assert 1 <= calls["good"] <= 2
    assert await pending_count(redis, stream, group) == 0
    # The failed attempts rolled back; only the good event is recorded.
    assert await processed(db, group) == {good_event}


async def test_unknown_event_type_is_acknowledged_and_skipped(
    db: Database, redis: RedisClient, infra: Infra, names: tuple[str, str]
) -> None:
    producer, group = names
    stream = stream_name(infra.namespace, producer)
    seen: list[str] = []

    async def handler(uow: UnitOfWork, event: ReceivedEvent) -> None:
        seen.append(event.envelope.event_type)

    _, unknown_event = await xadd(
        redis, stream, producer, events_pb2.MemberRegistered(member_id=str(uuid.uuid4()))
    )
    _, good_event = await xadd(redis, stream, producer, events_pb2.OrderCompleted(order_id="o-1"))

    async with running(consumer_for(group, db, redis, infra, producer, handler)):
        await eventually(lambda: seen)
        await eventually(lambda: _drained(redis, stream, group))

    assert seen == ["loyalty.events.v1.OrderCompleted"]
    assert await pending_count(redis, stream, group) == 0
    assert not await redis.exists(dead_letter_stream(infra.namespace, producer, group))
    assert unknown_event not in await processed(db, group)
    assert good_event in await processed(db, group)


async def _drained(redis: RedisClient, stream: str, group: str) -> bool:
    """The group has read the whole stream and acknowledged everything it read."""
    groups = [g for g in await redis.xinfo_groups(stream) if g["name"].decode() == group]
    if not groups:  # the consumer has not created its group yet
        return False
    last = (await redis.xinfo_stream(stream))["last-generated-id"]
    return bool(groups[0]["last-delivered-id"] == last and groups[0]["pending"] == 0)


async def test_unreadable_entry_is_dead_lettered_at_once(
    db: Database, redis: RedisClient, infra: Infra, names: tuple[str, str]
) -> None:
    producer, group = names
    stream = stream_name(infra.namespace, producer)

    async def handler(uow: UnitOfWork, event: ReceivedEvent) -> None:
        raise AssertionError("an unreadable entry must never reach a handler")

    garbage = await redis.xadd(stream, {ENVELOPE_FIELD: b"\xff\xfe not a protobuf"})
    dlq = dead_letter_stream(infra.namespace, producer, group)
    async with running(consumer_for(group, db, redis, infra, producer, handler)):
        entries = await eventually(lambda: redis.xrange(dlq))
    fields = entries[0][1]
    assert fields[b"error"].startswith(b"unreadable envelope")
    assert fields[b"source_id"] == garbage
    assert await pending_count(redis, stream, group) == 0


@pytest.fixture
async def outbox_db(db: Database) -> AsyncIterator[Database]:
    """A private schema with its own outbox, so no running service's relay claims the rows."""
    schema = f"kit_{uuid.uuid4().hex[:8]}"
    await db.pool.execute(
        f"CREATE SCHEMA {schema};"
        f" CREATE TABLE {schema}.outbox (LIKE tiering.outbox INCLUDING ALL);"
        f" CREATE TABLE {schema}.effects (event_id uuid NOT NULL, order_id text NOT NULL);"
    )
    yield Database(db.pool, schema, "kit-outbox")
    await db.pool.execute(f"DROP SCHEMA {schema} CASCADE")


async def test_relay_crash_between_xadd_and_marking_published_yields_one_effect(
    db: Database, outbox_db: Database, redis: RedisClient, infra: Infra, names: tuple[str, str]
) -> None:
    producer, group = names
    stream = stream_name(infra.namespace, producer)
    schema = outbox_db.schema
    async with outbox_db.unit_of_work() as uow:
        event_id = await uow.emit(events_pb2.OrderCompleted(order_id="o-crash"))

    # The relay XADDs, then marking the row published fails: the transaction
    # rolls back and the row stays unpublished, exactly as if the process died
    # between the two.
    await db.pool.execute(
        f"CREATE FUNCTION {schema}.crash() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'simulated crash after XADD'; END $$;"
        f" CREATE TRIGGER crash BEFORE UPDATE OF published_at ON {schema}.outbox"
        f" FOR EACH ROW EXECUTE FUNCTION {schema}.crash();"
    )
    relay = OutboxRelay(outbox_db, redis, stream)
    with pytest.raises(asyncpg.exceptions.RaiseError, match="simulated crash"):
        await relay.publish_pending()
    unpublished = f"SELECT count(*) FROM {schema}.outbox WHERE published_at IS NULL"
    assert await db.pool.fetchval(unpublished) == 1

    # The restarted relay publishes the same row again (same number), and this
    # time marks it; the row is kept for replays.
    await db.pool.execute(f"DROP TRIGGER crash ON {schema}.outbox")
    assert await relay.publish_pending() == 1
    assert await db.pool.fetchval(unpublished) == 0
    assert await db.pool.fetchval(f"SELECT count(*) FROM {schema}.outbox") == 1
    published = await redis.xrange(stream)
    envelopes = [events_pb2.EventEnvelope.FromString(f[ENVELOPE_FIELD]) for _, f in published]
    assert [e.event_id for e in envelopes] == [event_id, event_id]
    assert [f[SEQ_FIELD] for _, f in published] == [b"1", b"1"]

    calls = 0

    async def handler(uow: UnitOfWork, event: ReceivedEvent) -> None:
        nonlocal calls
        calls += 1
        await uow.conn.execute(
            f"INSERT INTO {schema}.effects (event_id, order_id) VALUES ($1, $2)",
            uuid.UUID(event.envelope.event_id),
            event.payload.order_id,  # type: ignore[attr-defined]
        )

    async with running(consumer_for(group, db, redis, infra, producer, handler)):
        await eventually(lambda: _drained(redis, stream, group))

    assert calls == 1
    effects = await db.pool.fetch(f"SELECT event_id, order_id FROM {schema}.effects")
    assert [(str(r["event_id"]), r["order_id"]) for r in effects] == [(event_id, "o-crash")]
    assert await processed(db, group) == {event_id}


async def test_one_read_shares_one_commit_and_a_failing_event_rolls_back_alone(
    db: Database, outbox_db: Database, redis: RedisClient, infra: Infra, names: tuple[str, str]
) -> None:
    """Events read together are applied in one transaction (one COMMIT for the
    lot); when one fails, that transaction rolls back and the read is applied
    again with each event in its own savepoint: the poison event's write is
    undone, its neighbours' are kept, and each good event is applied exactly
    once (its handler may have run once more in the rolled-back try)."""
    producer, group = names
    stream = stream_name(infra.namespace, producer)
    schema = outbox_db.schema
    calls: Counter[str] = Counter()
    transactions: dict[str, int] = {}

    async def handler(uow: UnitOfWork, event: ReceivedEvent) -> None:
        order_id = event.payload.order_id  # type: ignore[attr-defined]
        calls[order_id] += 1
        transactions[order_id] = await uow.conn.fetchval("SELECT txid_current()")
        await uow.conn.execute(
            f"INSERT INTO {schema}.effects (event_id, order_id) VALUES ($1, $2)",
            uuid.UUID(event.envelope.event_id),
            order_id,
        )
        if order_id == "poison":
            raise RuntimeError("poison after its write")

    orders = ("first", "poison", "second", "third")
    published = [
        await xadd(redis, stream, producer, events_pb2.OrderCompleted(order_id=order))
        for order in orders
    ]
    # Published before the consumer starts, so its first read returns all four.
    dlq = dead_letter_stream(infra.namespace, producer, group)
    async with running(consumer_for(group, db, redis, infra, producer, handler)):
        await eventually(lambda: redis.xrange(dlq), timeout=10)
        await eventually(lambda: _drained(redis, stream, group))

    # The first delivery ran the read together (up to the poison, in member
    # order), then one by one; each retry of the poison alone runs it once.
    assert all(1 <= calls[order] <= 2 for order in ("first", "second", "third"))
    assert calls["poison"] == MAX_ATTEMPTS + 1
    assert transactions["first"] == transactions["second"] == transactions["third"]
    effects = await db.pool.fetch(f"SELECT order_id FROM {schema}.effects ORDER BY order_id")
    assert [r["order_id"] for r in effects] == ["first", "second", "third"]
    good = {event for (_, event), order in zip(published, orders, strict=True) if order != "poison"}
    assert await processed(db, group) == good


async def test_a_reading_unit_of_work_has_no_transaction_and_cannot_emit(db: Database) -> None:
    async with db.reading() as uow:
        # No BEGIN: every statement is its own transaction.
        first = await uow.conn.fetchval("SELECT txid_current()")
        second = await uow.conn.fetchval("SELECT txid_current()")
        assert first != second
        with pytest.raises(RuntimeError, match="writes nothing"):
            await uow.emit(events_pb2.OrderCompleted(order_id="never"))
    async with db.unit_of_work() as uow:
        first = await uow.conn.fetchval("SELECT txid_current()")
        assert await uow.conn.fetchval("SELECT txid_current()") == first


async def test_a_read_is_applied_in_member_order_keeping_each_members_own_order(
    db: Database, redis: RedisClient, infra: Infra, names: tuple[str, str]
) -> None:
    """Members are locked in id order, like the batch jobs' chunks (no
    deadlock between them); one member's events stay in their order."""
    producer, group = names
    stream = stream_name(infra.namespace, producer)
    members = sorted(str(uuid.uuid4()) for _ in range(3))
    sent = [(members[2], "c1"), (members[0], "a1"), (members[1], "b1"), (members[0], "a2")]
    for member, order_id in sent:
        envelope = make_envelope(producer, events_pb2.OrderCompleted(order_id=order_id), member)
        await redis.xadd(stream, {ENVELOPE_FIELD: envelope.SerializeToString()})
    applied: list[str] = []

    async def handler(uow: UnitOfWork, event: ReceivedEvent) -> None:
        applied.append(event.payload.order_id)  # type: ignore[attr-defined]

    async with running(consumer_for(group, db, redis, infra, producer, handler)):
        await eventually(lambda: _drained(redis, stream, group))
    assert applied == ["a1", "a2", "b1", "c1"]


async def test_a_stopped_consumer_leaves_its_loop_without_being_cancelled(
    db: Database, redis: RedisClient, infra: Infra, names: tuple[str, str]
) -> None:
    """A cancellation redis-py misses inside XREADGROUP must not keep the loop
    (and the process) alive: stop() ends it at the next read."""
    producer, group = names

    async def handler(uow: UnitOfWork, event: ReceivedEvent) -> None:
        return None

    consumer = consumer_for(group, db, redis, infra, producer, handler)
    task = asyncio.create_task(consumer.run())
    await asyncio.sleep(0.2)  # in its blocking read by now
    consumer.stop()
    await asyncio.wait_for(task, timeout=5)  # returns on its own: no cancel() here
    assert task.done() and not task.cancelled() and task.exception() is None


async def test_a_group_reading_several_producers_gets_every_stream_s_events(
    db: Database, redis: RedisClient, infra: Infra, names: tuple[str, str]
) -> None:
    """Each producer's stream has a slot of its own on a cluster, where one
    XREADGROUP may not span slots: the group reads them with one reader per
    slot (one read for all on a single Redis) and misses none."""
    first, group = names
    second = f"{first}-b"
    producers = [first, second]
    streams = [stream_name(infra.namespace, p) for p in producers]
    seen: list[str] = []

    async def handler(uow: UnitOfWork, event: ReceivedEvent) -> None:
        seen.append(event.payload.order_id)  # type: ignore[attr-defined]

    consumer = EventConsumer(
        group,
        db,
        redis,
        infra.namespace,
        [Subscription(p, events_pb2.OrderCompleted, handler) for p in producers],
        max_attempts=MAX_ATTEMPTS,
        retry_after_ms=100,
        block_ms=50,
    )
    reads = consumer.read_sets()
    assert sorted(s for read in reads for s in read) == sorted(streams)
    for read in reads:  # no read spans two slots
        assert len({slot_of(s) for s in read}) == 1 or not isinstance(redis, RedisCluster)
    if isinstance(redis, RedisCluster) and slot_of(streams[0]) != slot_of(streams[1]):
        assert len(reads) == 2
    async with running(consumer):
        for i, (producer, stream) in enumerate(zip(producers, streams, strict=True)):
            await xadd(redis, stream, producer, events_pb2.OrderCompleted(order_id=f"o-{i}"))
        await eventually(lambda: sorted(seen) == ["o-0", "o-1"])
        for stream in streams:
            await eventually(lambda stream=stream: _drained(redis, stream, group))
    assert sorted(seen) == ["o-0", "o-1"]
