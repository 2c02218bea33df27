"""A consumer's read applied as one batch (servicekit/consumer.py) on real Redis
and PostgreSQL: one commit for the events of every stream a read covers and
those arriving within the linger, one processed_events statement for the lot
(unhandled types included, so the cursor walks over them), a redelivered event
inside a read applied once, a failing event rolled back alone, and a crash
between the commit and the acknowledgement changing nothing on redelivery.

Each test has its own producers and group, recording into the tiering schema's
processed_events and event_cursors and a private effects table.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

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
from servicekit.redis_client import RedisClient, slot_of

from ..harness import Infra, eventually

MAX_ATTEMPTS = 2


@pytest.fixture
async def db(infra: Infra) -> AsyncIterator[Database]:
    pool = await create_pool(infra.database_url, 1, 5)
    database = Database(pool, "tiering", "kit-test")
    yield database
    await database.close()


@pytest.fixture
def names() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"bat-{tag}", f"bgroup-{tag}"


class Effects:
    """A handler writing each order into the test's own table, in the event's
    transaction, with the transaction id it ran in; `fail` names orders that
    raise after their write."""

    def __init__(self, db: Database, fail: frozenset[str] = frozenset()) -> None:
        self.db = db
        self.table = f"bat_{uuid.uuid4().hex[:8]}"
        self.fail = fail
        self.calls: Counter[str] = Counter()

    async def create(self) -> None:
        await self.db.pool.execute(
            f"CREATE TABLE tiering.{self.table} (order_id text NOT NULL, tx bigint NOT NULL)"
        )

    async def drop(self) -> None:
        await self.db.pool.execute(f"DROP TABLE tiering.{self.table}")

    async def __call__(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
        order_id = event.payload.order_id  # type: ignore[attr-defined]
        self.calls[order_id] += 1
        await uow.conn.execute(
            f"INSERT INTO tiering.{self.table} (order_id, tx) VALUES ($1, txid_current())",
            order_id,
        )
        if order_id in self.fail:
            raise RuntimeError(f"order {order_id} cannot be applied")

    async def committed(self) -> dict[str, list[int]]:
        rows = await self.db.pool.fetch(f"SELECT order_id, tx FROM tiering.{self.table}")
        out: dict[str, list[int]] = {}
        for r in rows:
            out.setdefault(r["order_id"], []).append(r["tx"])
        return out


@pytest.fixture
async def effects(db: Database) -> AsyncIterator[Effects]:
    e = Effects(db)
    await e.create()
    yield e
    await e.drop()


def consumer(
    group: str,
    db: Database,
    redis: RedisClient,
    infra: Infra,
    producers: list[str],
    handler: Effects,
    linger_ms: float = 0,
) -> EventConsumer:
    return EventConsumer(
        group,
        db,
        redis,
        infra.namespace,
        [Subscription(p, events_pb2.OrderCompleted, handler) for p in producers],
        max_attempts=MAX_ATTEMPTS,
        retry_after_ms=100,
        block_ms=50,
        gap_grace_seconds=60,  # no replay asked for in these tests
        linger_ms=linger_ms,
    )


@contextlib.asynccontextmanager
async def running(c: EventConsumer) -> AsyncIterator[None]:
    task = asyncio.create_task(c.run())
    try:
        yield
    finally:
        c.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=10)


async def publish(
    redis: RedisClient,
    stream: str,
    producer: str,
    payload: Message,
    seq: int | None = None,
    envelope: Any = None,
) -> str:
    """Publish like the relay does (with a sequence number when given); returns the event id."""
    envelope = envelope or make_envelope(producer, payload, str(uuid.uuid4()))
    fields = {ENVELOPE_FIELD: envelope.SerializeToString()}
    if seq is not None:
        fields[SEQ_FIELD] = str(seq).encode()
    await redis.xadd(stream, fields)  # type: ignore[arg-type]
    return str(envelope.event_id)


async def drained(redis: RedisClient, stream: str, group: str) -> bool:
    groups = [g for g in await redis.xinfo_groups(stream) if g["name"].decode() == group]
    if not groups:
        return False
    last = (await redis.xinfo_stream(stream))["last-generated-id"]
    return bool(groups[0]["last-delivered-id"] == last and groups[0]["pending"] == 0)


async def processed_seqs(db: Database, group: str) -> list[int]:
    rows = await db.pool.fetch(
        "SELECT seq FROM tiering.processed_events WHERE consumer = $1 AND seq IS NOT NULL"
        " ORDER BY seq",
        group,
    )
    return [r["seq"] for r in rows]


async def test_a_read_of_several_streams_is_one_commit_and_unhandled_types_count_on_the_cursor(
    db: Database, redis: RedisClient, infra: Infra, names: tuple[str, str], effects: Effects
) -> None:
    """Before: one transaction per stream of a read, and the unhandled types'
    rows in a statement (and commit) of their own."""
    first, group = names
    second = f"{first}-b"
    streams = {p: stream_name(infra.namespace, p) for p in (first, second)}
    # Sequenced like the relay's entries; OrderRefunded is not for this group.
    await publish(redis, streams[first], first, events_pb2.OrderCompleted(order_id="a"), 1)
    await publish(redis, streams[first], first, events_pb2.OrderRefunded(refund_id="r1"), 2)
    await publish(redis, streams[first], first, events_pb2.OrderCompleted(order_id="b"), 3)
    await publish(redis, streams[second], second, events_pb2.OrderRefunded(refund_id="r2"), 1)
    await publish(redis, streams[second], second, events_pb2.OrderCompleted(order_id="c"), 2)

    c = consumer(group, db, redis, infra, [first, second], effects)
    async with running(c):
        for stream in streams.values():
            await eventually(lambda stream=stream: drained(redis, stream, group))

    applied = await effects.committed()
    assert sorted(applied) == ["a", "b", "c"] and all(len(t) == 1 for t in applied.values())
    assert applied["a"] == applied["b"]
    one_read = not isinstance(redis, RedisCluster) or slot_of(streams[first]) == slot_of(
        streams[second]
    )
    if one_read:  # both streams came in one XREADGROUP: one commit for all
        assert applied["a"] == applied["c"]
    # Every number of both producers is recorded, unhandled types included...
    rows = await db.pool.fetch(
        "SELECT producer, seq FROM tiering.processed_events WHERE consumer = $1", group
    )
    assert sorted((r["producer"], r["seq"]) for r in rows) == [
        (first, 1),
        (first, 2),
        (first, 3),
        (second, 1),
        (second, 2),
    ]
    # ...so each cursor walks to the producer's last event, with no gap.
    status = await c.check_cursor(streams[first])
    assert (status.applied, status.replay_from, status.gaps_found) == (3, None, 0)
    status = await c.check_cursor(streams[second])
    assert (status.applied, status.replay_from, status.gaps_found) == (2, None, 0)


async def test_events_arriving_within_the_linger_join_the_read_s_commit(
    db: Database, redis: RedisClient, infra: Infra, names: tuple[str, str], effects: Effects
) -> None:
    """The second event is published after the first read returned (the read
    is wrapped to do so, no timing involved): with a linger the consumer reads
    again before it commits, and both share one transaction."""
    producer, group = names
    stream = stream_name(infra.namespace, producer)
    c = consumer(group, db, redis, infra, [producer], effects, linger_ms=5)
    plain_read = c._read
    published_late = False

    async def read_then_publish(*args: Any, **kwargs: Any) -> Any:
        nonlocal published_late
        got = await plain_read(*args, **kwargs)
        if got and not published_late:
            published_late = True
            await publish(redis, stream, producer, events_pb2.OrderCompleted(order_id="late"))
        return got

    c._read = read_then_publish  # type: ignore[method-assign]
    await publish(redis, stream, producer, events_pb2.OrderCompleted(order_id="early"))
    async with running(c):
        await eventually(lambda: effects.committed())
        await eventually(lambda: drained(redis, stream, group))
    applied = await effects.committed()
    assert sorted(applied) == ["early", "late"]
    assert applied["early"] == applied["late"]


async def test_an_event_delivered_twice_in_one_read_is_applied_once(
    db: Database, redis: RedisClient, infra: Infra, names: tuple[str, str], effects: Effects
) -> None:
    """A replayed or redriven event can sit in the same read as its first
    delivery: one processed_events statement records it once, the handler
    runs once, and both entries are acknowledged."""
    producer, group = names
    stream = stream_name(infra.namespace, producer)
    twice = make_envelope(producer, events_pb2.OrderCompleted(order_id="twice"), "m-1")
    await publish(redis, stream, producer, events_pb2.OrderCompleted(), envelope=twice)
    await publish(redis, stream, producer, events_pb2.OrderCompleted(order_id="other"))
    await publish(redis, stream, producer, events_pb2.OrderCompleted(), envelope=twice)

    async with running(consumer(group, db, redis, infra, [producer], effects)):
        await eventually(lambda: drained(redis, stream, group))
    applied = await effects.committed()
    assert {k: len(v) for k, v in applied.items()} == {"twice": 1, "other": 1}
    assert effects.calls["twice"] == 1
    assert applied["twice"] == applied["other"]  # still one commit


async def test_a_failing_event_in_a_read_rolls_back_alone_and_the_cursor_passes_it(
    db: Database, redis: RedisClient, infra: Infra, names: tuple[str, str]
) -> None:
    """The read's one transaction fails on the poison event: it is applied
    again one event at a time, so its neighbours commit once, the poison is
    retried then dead-lettered, and the unhandled type's number and the
    dead letter's still let the cursor walk to the end."""
    producer, group = names
    stream = stream_name(infra.namespace, producer)
    effects = Effects(db, fail=frozenset({"poison"}))
    await effects.create()
    try:
        await publish(redis, stream, producer, events_pb2.OrderCompleted(order_id="a"), 1)
        await publish(redis, stream, producer, events_pb2.OrderRefunded(refund_id="r"), 2)
        await publish(redis, stream, producer, events_pb2.OrderCompleted(order_id="poison"), 3)
        await publish(redis, stream, producer, events_pb2.OrderCompleted(order_id="b"), 4)
        dlq = dead_letter_stream(infra.namespace, producer, group)
        c = consumer(group, db, redis, infra, [producer], effects)
        async with running(c):
            await eventually(lambda: redis.xrange(dlq), timeout=10)
            await eventually(lambda: drained(redis, stream, group))
        applied = await effects.committed()
        assert {k: len(v) for k, v in applied.items()} == {"a": 1, "b": 1}
        assert applied["a"] == applied["b"]
        # The first delivery tried the whole read, then each event: every
        # delivery of the poison runs it, nothing of it is committed.
        assert effects.calls["poison"] >= MAX_ATTEMPTS
        assert await processed_seqs(db, group) == [1, 2, 3, 4]
        status = await c.check_cursor(stream)
        assert (status.applied, status.replay_from) == (4, None)
    finally:
        await effects.drop()


async def test_a_crash_between_the_commit_and_the_ack_changes_nothing_on_redelivery(
    db: Database, redis: RedisClient, infra: Infra, names: tuple[str, str], effects: Effects
) -> None:
    """The read commits, then the acknowledgement is lost (the process dies,
    Redis drops the connection): the entries stay pending, are claimed again,
    find their ids recorded and are acknowledged without a second effect."""
    producer, group = names
    stream = stream_name(infra.namespace, producer)
    c = consumer(group, db, redis, infra, [producer], effects)
    plain_ack = c._ack
    lost = 0

    async def ack_lost_once(acks: dict[str, list[str]], moved: list[str] | None = None) -> None:
        nonlocal lost
        if not lost:
            lost = sum(len(ids) for ids in acks.values())
            raise ConnectionError("gone before XACK")
        await plain_ack(acks, moved)

    c._ack = ack_lost_once  # type: ignore[method-assign]
    for order_id in ("x", "y", "z"):
        await publish(redis, stream, producer, events_pb2.OrderCompleted(order_id=order_id))
    async with running(c):
        await eventually(lambda: drained(redis, stream, group), timeout=10)
    assert lost == 3  # the first read's three entries were committed, not acknowledged
    applied = await effects.committed()
    assert {k: len(v) for k, v in applied.items()} == {"x": 1, "y": 1, "z": 1}
    assert effects.calls == Counter({"x": 1, "y": 1, "z": 1})


class BatchEffects(Effects):
    """Effects with a batch handler: it records each run it is given."""

    def __init__(self, db: Database, fail: frozenset[str] = frozenset()) -> None:
        super().__init__(db, fail)
        self.runs: list[list[str]] = []

    async def batch(self, uow: UnitOfWork, events: list[ReceivedEvent]) -> None:
        self.runs.append([e.payload.order_id for e in events])  # type: ignore[attr-defined]
        for event in events:
            await self(uow, event)


def batch_consumer(
    group: str, db: Database, redis: RedisClient, infra: Infra, producer: str, fx: BatchEffects
) -> EventConsumer:
    return EventConsumer(
        group,
        db,
        redis,
        infra.namespace,
        [Subscription(producer, events_pb2.OrderCompleted, fx, batch=fx.batch)],
        max_attempts=MAX_ATTEMPTS,
        retry_after_ms=100,
        block_ms=50,
        gap_grace_seconds=60,
    )


async def publish_for(
    redis: RedisClient, stream: str, producer: str, member: str, order_id: str, seq: int
) -> None:
    envelope = make_envelope(producer, events_pb2.OrderCompleted(order_id=order_id), member)
    await publish(redis, stream, producer, events_pb2.OrderCompleted(), seq, envelope=envelope)


async def test_a_batch_handler_gets_the_read_s_runs_of_distinct_members_in_order(
    db: Database, redis: RedisClient, infra: Infra, names: tuple[str, str]
) -> None:
    """In member order, a member's second event starts a new run (a batch
    handler may assume one event per member), and the read is still one
    commit."""
    producer, group = names
    stream = stream_name(infra.namespace, producer)
    fx = BatchEffects(db)
    await fx.create()
    try:
        await publish_for(redis, stream, producer, "m-b", "b1", 1)
        await publish_for(redis, stream, producer, "m-a", "a1", 2)
        await publish_for(redis, stream, producer, "m-c", "c1", 3)
        await publish_for(redis, stream, producer, "m-a", "a2", 4)
        async with running(batch_consumer(group, db, redis, infra, producer, fx)):
            await eventually(lambda: drained(redis, stream, group))
        # a1 alone (the handler's), then a run of three (the batch handler's).
        assert fx.runs == [["a2", "b1", "c1"]]
        applied = await fx.committed()
        assert sorted(applied) == ["a1", "a2", "b1", "c1"]
        assert len({tx for txs in applied.values() for tx in txs}) == 1
    finally:
        await fx.drop()


async def test_a_failing_batch_is_applied_again_event_by_event(
    db: Database, redis: RedisClient, infra: Infra, names: tuple[str, str]
) -> None:
    """The batch's failure rolls the read back; each event is then applied
    with the one-event handler, so the poison is dead-lettered alone."""
    producer, group = names
    stream = stream_name(infra.namespace, producer)
    fx = BatchEffects(db, fail=frozenset({"poison"}))
    await fx.create()
    try:
        await publish_for(redis, stream, producer, "m-a", "a", 1)
        await publish_for(redis, stream, producer, "m-b", "poison", 2)
        await publish_for(redis, stream, producer, "m-c", "c", 3)
        dlq = dead_letter_stream(infra.namespace, producer, group)
        async with running(batch_consumer(group, db, redis, infra, producer, fx)):
            await eventually(lambda: redis.xrange(dlq), timeout=10)
            await eventually(lambda: drained(redis, stream, group))
        assert {k: len(v) for k, v in (await fx.committed()).items()} == {"a": 1, "c": 1}
        assert await processed_seqs(db, group) == [1, 2, 3]
    finally:
        await fx.drop()


async def test_a_read_of_unhandled_types_only_opens_no_transaction_and_still_counts(
    db: Database, redis: RedisClient, infra: Infra, names: tuple[str, str], effects: Effects
) -> None:
    """Before: each such read paid an INSERT and a commit of its own. Now its
    numbers are held (the entries acknowledged: handling them is a no-op) and
    recorded by the next cursor check, so the cursor walks over them with no
    gap; they ride with the next handled read's transaction too, and a
    stopping consumer records what it holds."""
    producer, group = names
    stream = stream_name(infra.namespace, producer)
    c = consumer(group, db, redis, infra, [producer], effects)
    c.configure_gaps(60, 3600)  # no cursor check of its own during the test
    await publish(redis, stream, producer, events_pb2.OrderRefunded(refund_id="r1"), 1)
    await publish(redis, stream, producer, events_pb2.OrderRefunded(refund_id="r2"), 2)
    async with running(c):
        await eventually(lambda: drained(redis, stream, group))
        assert await processed_seqs(db, group) == []  # nothing written for them yet
        status = await c.check_cursor(stream)
        assert (status.applied, status.replay_from, status.gaps_found) == (2, None, 0)
        # Held again, then carried by the next handled read's one commit.
        await publish(redis, stream, producer, events_pb2.OrderRefunded(refund_id="r3"), 3)
        await eventually(lambda: drained(redis, stream, group))
        await publish(redis, stream, producer, events_pb2.OrderCompleted(order_id="o"), 4)
        await eventually(lambda: effects.committed())
        assert await processed_seqs(db, group) == [1, 2, 3, 4]
        await publish(redis, stream, producer, events_pb2.OrderRefunded(refund_id="r5"), 5)
        await eventually(lambda: drained(redis, stream, group))
    assert await processed_seqs(db, group) == [1, 2, 3, 4, 5]  # recorded on the way out
