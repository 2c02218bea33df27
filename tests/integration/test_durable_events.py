"""Durable events on real Redis and PostgreSQL (servicekit/outbox.py,
servicekit/consumer.py): gap-free numbering under concurrent commits and
rollbacks, and no event lost when Redis loses a stream while a consumer lags,
loses entries in the middle of a stream, or at its tail.

Each test has its own producer (a private outbox schema) and consumer group;
the consumer records into the tiering schema's processed_events and
event_cursors. Redis data loss is simulated by deleting this test's keys only
(the server is shared).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest

from loyalty.events.v1 import events_pb2
from servicekit.consumer import (
    GAPS_FOUND,
    GAPS_HEALED,
    STREAMS_LOST,
    EventConsumer,
    Subscription,
)
from servicekit.db import Database, UnitOfWork, create_pool
from servicekit.events import ENVELOPE_FIELD, SEQ_FIELD, ReceivedEvent, head_key, stream_name
from servicekit.eventstatus import events_status
from servicekit.outbox import OutboxRelay
from servicekit.redis_client import RedisClient
from servicekit.retention import Pruner, Retention

from ..harness import Infra, eventually


@pytest.fixture
async def db(infra: Infra) -> AsyncIterator[Database]:
    pool = await create_pool(infra.database_url, 1, 10)
    database = Database(pool, "tiering", "kit-test")
    yield database
    await database.close()


@pytest.fixture
def names() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"dur-{tag}", f"dgroup-{tag}"


@pytest.fixture
async def outbox_db(db: Database, names: tuple[str, str]) -> AsyncIterator[Database]:
    """A private outbox (the real table's shape), so no running service's relay claims it."""
    schema = f"dur_{uuid.uuid4().hex[:8]}"
    await db.pool.execute(
        f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.outbox (LIKE tiering.outbox INCLUDING ALL);"
        f" CREATE TABLE {schema}.effects (order_id text NOT NULL)"
    )
    yield Database(db.pool, schema, names[0])
    await db.pool.execute(f"DROP SCHEMA {schema} CASCADE")


class Applied:
    """A handler recording what it applied, per order id, in the test's own
    table: in the event's transaction, so only committed effects count (a
    read cancelled by a stop rolls back and is applied again)."""

    def __init__(self, db: Database, schema: str) -> None:
        self._db = db
        self._table = f"{schema}.effects"

    async def __call__(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
        await uow.conn.execute(
            f"INSERT INTO {self._table} (order_id) VALUES ($1)",
            event.payload.order_id,  # type: ignore[attr-defined]
        )

    async def counts(self) -> Counter[str]:
        rows = await self._db.pool.fetch(f"SELECT order_id FROM {self._table}")
        return Counter(r["order_id"] for r in rows)

    async def has(self, n: int) -> bool:
        return len(await self.counts()) == n


def make_consumer(
    group: str, db: Database, redis: RedisClient, infra: Infra, producer: str, handler: Applied
) -> EventConsumer:
    return EventConsumer(
        group,
        db,
        redis,
        infra.namespace,
        [Subscription(producer, events_pb2.OrderCompleted, handler)],
        retry_after_ms=100,
        block_ms=50,
        gap_grace_seconds=0.3,
        check_interval_seconds=0.1,
    )


@contextlib.asynccontextmanager
async def running(*loops: EventConsumer | OutboxRelay) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(loop.run()) for loop in loops]
    try:
        yield
    finally:
        # As ServiceApp.stop does: each loop finishes the work in hand and
        # leaves (a cancel would roll back a relay's batch after its XADD).
        for loop in loops:
            loop.stop()
        _, late = await asyncio.wait(tasks, timeout=10)
        for task in late:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=10)


async def emit(outbox_db: Database, *order_ids: str) -> None:
    for order_id in order_ids:
        async with outbox_db.unit_of_work() as uow:
            await uow.emit(events_pb2.OrderCompleted(order_id=order_id), str(uuid.uuid4()))


async def cursor(db: Database, group: str, producer: str) -> dict[str, int]:
    row = await db.pool.fetchrow(
        "SELECT applied_seq, gaps_found, gaps_healed, replay_from FROM tiering.event_cursors"
        " WHERE consumer = $1 AND producer = $2",
        group,
        producer,
    )
    return dict(row) if row else {}


async def test_sequence_is_gap_free_under_concurrent_commits_and_rollbacks(
    outbox_db: Database, redis: RedisClient, infra: Infra, names: tuple[str, str]
) -> None:
    """Identity values of rolled-back rows and commits out of id order leave
    no hole in the numbers: each committed event gets exactly one of 1..N."""
    stream = stream_name(infra.namespace, names[0])
    relay = OutboxRelay(outbox_db, redis, stream, batch_size=7)

    async def writer(n: int) -> None:
        for i in range(10):
            with contextlib.suppress(RuntimeError):
                async with outbox_db.unit_of_work() as uow:
                    await uow.emit(events_pb2.OrderCompleted(order_id=f"w{n}-{i}"))
                    await asyncio.sleep(0.001 * ((n + i) % 3))
                    if i % 4 == 3:
                        raise RuntimeError("rolled back")

    async def relaying() -> None:
        for _ in range(40):
            await relay.publish_pending()
            await asyncio.sleep(0.002)

    await asyncio.gather(*(writer(n) for n in range(6)), relaying())
    while await relay.publish_pending():
        pass
    committed = await outbox_db.pool.fetchval(f"SELECT count(*) FROM {outbox_db.schema}.outbox")
    seqs = [int(f[SEQ_FIELD]) for _, f in await redis.xrange(stream)]
    assert committed == 6 * (10 - 2)
    assert seqs == list(range(1, committed + 1))


async def test_no_event_lost_when_redis_loses_the_stream_while_the_consumer_lags(
    db: Database,
    outbox_db: Database,
    redis: RedisClient,
    infra: Infra,
    names: tuple[str, str],
) -> None:
    producer, group = names
    stream = stream_name(infra.namespace, producer)
    applied = Applied(db, outbox_db.schema)
    relay = OutboxRelay(outbox_db, redis, stream, poll_interval=0.05)
    consumer = make_consumer(group, db, redis, infra, producer, applied)

    await emit(outbox_db, "a1", "a2", "a3")
    async with running(relay, consumer):
        await eventually(lambda: applied.has(3))
    # The consumer is down: a backlog builds up in the stream...
    await emit(outbox_db, "b1", "b2", "b3", "b4")
    await relay.publish_pending()
    assert await redis.xlen(stream) == 7
    # ...and Redis restarts empty (for this test's keys: the server is shared).
    await redis.delete(stream, head_key(stream))
    await emit(outbox_db, "c1", "c2")

    lost_before = STREAMS_LOST.labels(group, producer)._value.get()
    # Both restart (new processes, the same group and producer).
    relay = OutboxRelay(outbox_db, redis, stream, poll_interval=0.05)
    consumer = make_consumer(group, db, redis, infra, producer, applied)
    async with running(relay, consumer):
        await eventually(lambda: applied.has(9))
        await eventually(lambda: _cursor_at(db, group, producer, 9))

    expected = {"a1", "a2", "a3", "b1", "b2", "b3", "b4", "c1", "c2"}
    assert await applied.counts() == Counter(expected)
    assert STREAMS_LOST.labels(group, producer)._value.get() == lost_before + 1


async def _cursor_at(db: Database, group: str, producer: str, seq: int) -> bool:
    return (await cursor(db, group, producer)).get("applied_seq") == seq


async def test_a_gap_in_the_middle_is_found_and_healed(
    db: Database,
    outbox_db: Database,
    redis: RedisClient,
    infra: Infra,
    names: tuple[str, str],
    redis_url: str,
) -> None:
    """An entry lost from the middle of the stream (a failover dropped it):
    the cursor stops before it while later events are applied; the consumer
    asks for a replay, counts the gap found and, once applied, healed."""
    producer, group = names
    stream = stream_name(infra.namespace, producer)
    applied = Applied(db, outbox_db.schema)
    relay = OutboxRelay(outbox_db, redis, stream, poll_interval=0.05)
    await emit(outbox_db, "o1", "o2", "o3", "o4")
    await relay.publish_pending()
    entries = await redis.xrange(stream)
    await redis.xdel(stream, entries[1][0])  # seq 2 is gone from Redis
    found = GAPS_FOUND.labels(group, producer)._value.get()
    healed = GAPS_HEALED.labels(group, producer)._value.get()

    consumer = make_consumer(group, db, redis, infra, producer, applied)
    async with running(consumer):
        await eventually(lambda: applied.has(3))
        await eventually(lambda: _replay_asked(db, group, producer, 2))
        # Only now the relay runs: the replay is what brings o2 back.
        async with running(relay):
            await eventually(lambda: _cursor_at(db, group, producer, 4))

    assert await applied.counts() == Counter({"o1": 1, "o2": 1, "o3": 1, "o4": 1})
    state = await cursor(db, group, producer)
    assert (state["gaps_found"], state["gaps_healed"], state["replay_from"]) == (1, 1, None)
    assert GAPS_FOUND.labels(group, producer)._value.get() == found + 1
    assert GAPS_HEALED.labels(group, producer)._value.get() == healed + 1

    # `events status` of the service whose schema holds the cursor shows it.
    status = await events_status("tiering", infra.service_settings(redis_url=redis_url))
    (mine,) = [c for c in status.cursors if c.consumer == group]
    assert (mine.applied, mine.gaps_found, mine.gaps_healed, mine.replay_from) == (4, 1, 1, None)
    row = next(line for line in status.render().splitlines() if line.startswith(group))
    assert row.split()[1:] == [producer, "4", "4", "0", "1", "1", "-"]


async def _replay_asked(db: Database, group: str, producer: str, seq: int) -> bool:
    return (await cursor(db, group, producer)).get("replay_from") == seq


async def test_events_lost_at_the_tail_are_found_by_the_producers_head(
    db: Database,
    outbox_db: Database,
    redis: RedisClient,
    infra: Infra,
    names: tuple[str, str],
) -> None:
    """No later event shows a gap at the tail: the producer's head does."""
    producer, group = names
    stream = stream_name(infra.namespace, producer)
    applied = Applied(db, outbox_db.schema)
    relay = OutboxRelay(outbox_db, redis, stream, poll_interval=0.05)
    await emit(outbox_db, "t1", "t2", "t3")
    await relay.publish_pending()
    entries = await redis.xrange(stream)
    await redis.xdel(stream, entries[2][0])  # the last one
    consumer = make_consumer(group, db, redis, infra, producer, applied)
    async with running(consumer, relay):
        await eventually(lambda: _cursor_at(db, group, producer, 3))
    assert await applied.counts() == Counter({"t1": 1, "t2": 1, "t3": 1})


async def test_a_pending_event_is_not_mistaken_for_a_gap(
    db: Database,
    outbox_db: Database,
    redis: RedisClient,
    infra: Infra,
    names: tuple[str, str],
) -> None:
    """An event failing and retrying holds the cursor, but it is in the
    group's pending list: no replay is asked for."""
    producer, group = names
    stream = stream_name(infra.namespace, producer)
    relay = OutboxRelay(outbox_db, redis, stream, poll_interval=0.05)
    failures = 0

    class Flaky(Applied):
        async def __call__(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
            nonlocal failures
            # Twice: a failed read is applied again one event at a time at once
            # (servicekit/consumer.py); the second failure leaves it pending.
            if event.payload.order_id == "slow" and failures < 2:  # type: ignore[attr-defined]
                failures += 1
                raise RuntimeError("not yet")
            await super().__call__(uow, event)

    applied = Flaky(db, outbox_db.schema)
    await emit(outbox_db, "slow", "next")
    await relay.publish_pending()
    consumer = make_consumer(group, db, redis, infra, producer, applied)
    consumer.configure_gaps(0.0, 0.05)  # would ask at once if it took the hole for a gap
    # Retried only after 1 s: the cursor stands still meanwhile.
    consumer._retry_after_ms = 1_000
    async with running(consumer):
        await eventually(lambda: applied.has(1))
        await asyncio.sleep(0.5)
        assert (await cursor(db, group, producer))["replay_from"] is None
        await eventually(lambda: _cursor_at(db, group, producer, 2), timeout=10)
    assert (await cursor(db, group, producer))["gaps_found"] == 0


async def test_published_events_are_kept_for_the_retention_window_and_the_newest_always(
    outbox_db: Database, redis: RedisClient, infra: Infra, names: tuple[str, str]
) -> None:
    stream = stream_name(infra.namespace, names[0])
    relay = OutboxRelay(outbox_db, redis, stream)
    await emit(outbox_db, "r1", "r2", "r3")
    await relay.publish_pending()
    table = f"{outbox_db.schema}.outbox"
    retention = Retention(
        table, "published_at", timedelta(days=7), where=f"seq < (SELECT max(seq) FROM {table})"
    )
    # The database's clock stamped published_at (the suite also runs with the
    # process clock moved a year ahead).
    now = await outbox_db.pool.fetchval("SELECT now()")
    within = Pruner(outbox_db.pool, [retention], 60, clock=lambda: now + timedelta(days=6))
    assert (await within.prune_once())[table] == 0
    after = Pruner(outbox_db.pool, [retention], 60, clock=lambda: now + timedelta(days=8))
    assert (await after.prune_once())[table] == 2
    # The newest stays: the next event is numbered 4, not 1.
    await emit(outbox_db, "r4")
    await relay.publish_pending()
    assert [int(f[SEQ_FIELD]) for _, f in await redis.xrange(stream)] == [1, 2, 3, 4]


async def test_two_relays_publish_every_event_once_in_number_order(
    db: Database, outbox_db: Database, redis: RedisClient, infra: Infra, names: tuple[str, str]
) -> None:
    """Two replicas' relays on one outbox, turning while commits land: each
    number is published once, in order, for one event (the lock spans a turn
    and the range is marked before it goes)."""
    stream = stream_name(infra.namespace, names[0])
    relays = [OutboxRelay(outbox_db, redis, stream, batch_size=5) for _ in range(2)]

    async def writer(n: int) -> None:
        for i in range(12):
            await emit(outbox_db, f"w{n}-{i}")
            await asyncio.sleep(0.001 * ((n + i) % 3))

    async def relaying(relay: OutboxRelay) -> None:
        for _ in range(60):
            await relay.publish_pending()
            await asyncio.sleep(0)

    await asyncio.gather(*(writer(n) for n in range(4)), *(relaying(r) for r in relays))
    while await relays[0].publish_pending():
        pass
    entries = await redis.xrange(stream)
    seqs = [int(f[SEQ_FIELD]) for _, f in entries]
    assert seqs == list(range(1, 4 * 12 + 1))
    event_ids = {
        events_pb2.EventEnvelope.FromString(f[ENVELOPE_FIELD]).event_id for _, f in entries
    }
    assert len(event_ids) == 4 * 12
    unpublished = f"SELECT count(*) FROM {outbox_db.schema}.outbox WHERE published_at IS NULL"
    assert await db.pool.fetchval(unpublished) == 0


async def test_a_failed_turn_leaves_the_lock_to_the_next_relay(
    db: Database, outbox_db: Database, redis: RedisClient, infra: Infra, names: tuple[str, str]
) -> None:
    """The relay's lock is a session lock: a turn that fails after the XADD
    (marking refused) must not keep it on the pooled connection, or every
    later turn of every replica would find it taken."""
    stream = stream_name(infra.namespace, names[0])
    schema = outbox_db.schema
    await emit(outbox_db, "o-1")
    await db.pool.execute(
        f"CREATE FUNCTION {schema}.crash() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'simulated crash after XADD'; END $$;"
        f" CREATE TRIGGER crash BEFORE UPDATE OF published_at ON {schema}.outbox"
        f" FOR EACH ROW EXECUTE FUNCTION {schema}.crash();"
    )
    relay = OutboxRelay(outbox_db, redis, stream)
    with pytest.raises(asyncpg.exceptions.RaiseError, match="simulated crash"):
        await relay.publish_pending()
    held = await db.pool.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND objid = hashtext($1)::oid",
        f"outbox:{schema}",
    )
    assert held == 0
    await db.pool.execute(f"DROP TRIGGER crash ON {schema}.outbox")
    await emit(outbox_db, "o-2")
    # Another relay (a replica) gets the lock and publishes o-1 again, then o-2.
    other = OutboxRelay(outbox_db, redis, stream)
    assert await other.publish_pending() == 2
    assert [f[SEQ_FIELD] for _, f in await redis.xrange(stream)] == [b"1", b"1", b"2"]


async def test_commits_right_behind_a_wakeup_share_one_relay_turn(
    outbox_db: Database, redis: RedisClient, infra: Infra, names: tuple[str, str]
) -> None:
    """The coalescing window: a commit wakes the relay, which waits before its
    turn, so the commits made meanwhile go out in the same turn."""
    stream = stream_name(infra.namespace, names[0])
    turns: list[int] = []

    class Counting(OutboxRelay):
        async def publish_pending(self) -> int:
            n = await super().publish_pending()
            turns.append(n)
            return n

    # No polling to speak of: only commits wake it; a window far longer than
    # the five commits take.
    relay = Counting(outbox_db, redis, stream, poll_interval=60, coalesce=2.0)
    async with running(relay):
        await eventually(lambda: turns == [0])  # its first turn (nothing to do) is over
        await emit(outbox_db, *(f"o-{i}" for i in range(5)))
        await eventually(lambda: _stream_len(redis, stream, 5))
    assert turns == [0, 5]


async def _stream_len(redis: RedisClient, stream: str, n: int) -> bool:
    return int(await redis.xlen(stream)) == n


async def test_a_turn_cancelled_as_the_lock_is_granted_leaves_no_lock_behind(
    db: Database, outbox_db: Database, redis: RedisClient, infra: Infra, names: tuple[str, str]
) -> None:
    """A cancel (the service stopping) that lands after PostgreSQL granted the
    session lock but before the relay saw the answer must not leave the lock on
    the pooled connection: the pool does not reset connections it is not told
    about, and every later turn on another connection (the drain's last
    publish, another replica) would find the lock taken and publish nothing."""
    stream = stream_name(infra.namespace, names[0])
    schema = outbox_db.schema

    class CancelledAtTheLock(OutboxRelay):
        async def _lock(self, conn: asyncpg.Connection) -> bool:
            await super()._lock(conn)
            raise asyncio.CancelledError

    await emit(outbox_db, "o-1")
    for turn in (
        CancelledAtTheLock(outbox_db, redis, stream).publish_pending,
        CancelledAtTheLock(outbox_db, redis, stream).sequence_pending,
    ):
        with pytest.raises(asyncio.CancelledError):
            await turn()
        held = await db.pool.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND objid = hashtext($1)::oid",
            f"outbox:{schema}",
        )
        assert held == 0
    assert await OutboxRelay(outbox_db, redis, stream).publish_pending() == 1


async def test_a_mark_lost_with_its_asynchronous_commit_while_redis_lost_the_entries(
    db: Database, outbox_db: Database, redis: RedisClient, infra: Infra, names: tuple[str, str]
) -> None:
    """The relay's mark commits asynchronously: a PostgreSQL crash may lose it
    after the XADD and the head went out. With Redis losing those entries too
    (and the head saying they were published), the range is still unmarked,
    so the next turn publishes it again, and a replay asked from before it
    (served only from marked rows) does not skip it: each event applied once."""
    producer, group = names
    stream = stream_name(infra.namespace, producer)
    applied = Applied(db, outbox_db.schema)
    relay = OutboxRelay(outbox_db, redis, stream, poll_interval=0.05)
    consumer = make_consumer(group, db, redis, infra, producer, applied)
    await emit(outbox_db, "m1", "m2")
    async with running(relay, consumer):
        await eventually(lambda: _cursor_at(db, group, producer, 2))
    await emit(outbox_db, "m3", "m4")
    assert await relay.publish_pending() == 2
    # The crash: the mark of m3..m4 never reached the disk; Redis restarts empty.
    await db.pool.execute(
        f"UPDATE {outbox_db.schema}.outbox SET published_at = NULL WHERE seq >= 3"
    )
    await redis.delete(stream, head_key(stream))
    await emit(outbox_db, "m5")
    relay = OutboxRelay(outbox_db, redis, stream, poll_interval=0.05)
    consumer = make_consumer(group, db, redis, infra, producer, applied)
    async with running(relay, consumer):
        await eventually(lambda: _cursor_at(db, group, producer, 5))
    assert await applied.counts() == Counter({f"m{i}": 1 for i in range(1, 6)})
    unpublished = f"SELECT count(*) FROM {outbox_db.schema}.outbox WHERE published_at IS NULL"
    assert await db.pool.fetchval(unpublished) == 0


async def test_an_idle_groups_cursor_check_skips_quiet_streams_and_still_finds_a_tail_gap(
    db: Database,
    outbox_db: Database,
    redis: RedisClient,
    infra: Infra,
    names: tuple[str, str],
) -> None:
    """A stream whose cursor stood at the producer's head at its last check,
    head unchanged since, costs its check no transaction (issue 19, the idle
    floor); once the head moves the check is a full one again, and an event
    lost at the tail after a long quiet spell is still found (no earlier than
    the grace after the stream stopped being quiet) and healed."""
    producer, group = names
    stream = stream_name(infra.namespace, producer)
    applied = Applied(db, outbox_db.schema)
    relay = OutboxRelay(outbox_db, redis, stream)
    await emit(outbox_db, "q1", "q2")
    await relay.publish_pending()
    consumer = make_consumer(group, db, redis, infra, producer, applied)
    async with running(consumer):
        await eventually(lambda: _cursor_at(db, group, producer, 2))
    consumer.configure_gaps(0.3, 3600)

    transactions = 0
    unit_of_work = db.unit_of_work

    def counting() -> UnitOfWork:
        nonlocal transactions
        transactions += 1
        return unit_of_work()

    db.unit_of_work = counting  # type: ignore[method-assign]
    await consumer.check_cursors()  # finds it at the head
    transactions = 0
    for _ in range(3):
        await consumer.check_cursors()
    assert transactions == 0  # main: one per stream per check

    # Quiet longer than the grace (checked now and then), then an event
    # whose entry Redis loses.
    await asyncio.sleep(0.5)
    await consumer.check_cursors()
    assert transactions == 0
    await emit(outbox_db, "q3")
    await relay.publish_pending()
    entries = await redis.xrange(stream)
    await redis.xdel(stream, entries[-1][0])
    await consumer.check_cursors()
    assert transactions == 1  # the head moved: a full check
    # Not asked at once: the quiet spell does not count as the cursor standing still.
    assert (await cursor(db, group, producer))["replay_from"] is None

    async def asked() -> bool:
        await consumer.check_cursors()
        return (await cursor(db, group, producer))["replay_from"] == 3

    await eventually(asked)
    await relay.serve_replays()
    consumer = make_consumer(group, db, redis, infra, producer, applied)  # the first one stopped
    async with running(consumer):
        await eventually(lambda: _cursor_at(db, group, producer, 3))
    assert await applied.counts() == Counter({"q1": 1, "q2": 1, "q3": 1})
    state = await cursor(db, group, producer)
    assert (state["gaps_found"], state["gaps_healed"]) == (1, 1)


class _CountingConnection:
    def __init__(self, conn: asyncpg.Connection, log: list[str]) -> None:
        self._conn = conn
        self._log = log

    def __getattr__(self, name: str) -> object:
        attr = getattr(self._conn, name)
        if name in ("execute", "fetch", "fetchrow", "fetchval"):

            async def counted(query: str, *args: object) -> object:
                self._log.append(query)
                return await attr(query, *args)

            return counted
        return attr


class _CountingPool:
    """A pool whose connections (acquired, or the pool's own shortcuts) log
    every statement sent."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.statements: list[str] = []

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[_CountingConnection]:
        async with self._pool.acquire() as conn:
            yield _CountingConnection(conn, self.statements)

    async def fetchrow(self, query: str, *args: object) -> object:
        self.statements.append(query)
        return await self._pool.fetchrow(query, *args)

    async def fetch(self, query: str, *args: object) -> object:
        self.statements.append(query)
        return await self._pool.fetch(query, *args)


async def test_an_idle_relay_turn_is_one_statement_and_a_lost_head_comes_back(
    outbox_db: Database, redis: RedisClient, infra: Infra, names: tuple[str, str]
) -> None:
    """With nothing to publish a turn is one statement, taking no lock (main:
    the lock, the turn's statement and the unlock); the head is not read from
    PostgreSQL at every upkeep, but comes back at the next one once Redis
    lost it."""
    stream = stream_name(infra.namespace, names[0])
    await emit(outbox_db, "h1")
    pool = _CountingPool(outbox_db.pool)
    relay = OutboxRelay(
        Database(pool, outbox_db.schema, names[0]),  # type: ignore[arg-type]
        redis,
        stream,
        poll_interval=0.05,
    )
    assert await relay.publish_pending() == 1
    pool.statements.clear()
    assert await relay.publish_pending() == 0
    assert len(pool.statements) == 1
    assert "pg_try_advisory_lock" in pool.statements[0]

    async with running(relay):
        await eventually(lambda: _head_is(redis, stream, b"1"))
        await asyncio.sleep(1.2)  # two upkeeps and more, idle
        pool.statements.clear()
        await asyncio.sleep(1.2)
        assert not [q for q in pool.statements if "max(seq)" in q]  # main: each upkeep
        await redis.delete(head_key(stream))
        await eventually(lambda: _head_is(redis, stream, b"1"))


async def _head_is(redis: RedisClient, stream: str, head: bytes) -> bool:
    return bool(await redis.hget(head_key(stream), b"head") == head)
