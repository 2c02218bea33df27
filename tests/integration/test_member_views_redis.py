"""The gateway's per-member views on real Redis, one Redis and a Redis
Cluster (servicekit/member_views.py): a view filled after a bump that came
between its read and its fill is not stored; the outbox relay's publish and a
consumer's acknowledgement bump the members their events name; a view is not
served under another identity epoch nor past its valid-until; without Redis
every read is a miss and nothing raises (fail open)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from loyalty.events.v1 import events_pb2
from servicekit.db import Database, create_pool
from servicekit.events import stream_name
from servicekit.member_views import IDENTIFY, VERSION, MemberViews, Miss, views_key
from servicekit.outbox import OutboxRelay
from servicekit.redis_client import RedisClient, create_redis

from ..harness import Infra, eventually

NOW = 1_900_000_000.0  # the views' clock in these tests (seconds)
EPOCH = b"7"


@pytest.fixture
def namespace() -> str:
    return f"mv-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def member() -> str:
    return str(uuid.uuid4())


def views(redis: RedisClient, namespace: str, now: list[float] | None = None) -> MemberViews:
    clock = now or [NOW]
    return MemberViews(redis, namespace, 120, "Asia/Shanghai", clock=lambda: clock[0])


def until(seconds: float) -> datetime:
    return datetime.fromtimestamp(NOW + seconds, UTC)


async def test_a_filled_view_is_served_under_its_version_epoch_and_valid_until(
    redis: RedisClient, namespace: str, member: str
) -> None:
    clock = [NOW]
    mv = views(redis, namespace, clock)
    miss = await mv.read(member, IDENTIFY, EPOCH)
    assert miss == Miss(b"0")
    await mv.fill(member, IDENTIFY, miss, EPOCH, b'[10,"svip","SVIP"]', until(60))
    assert await mv.read(member, IDENTIFY, EPOCH) == b'[10,"svip","SVIP"]'
    # A merge or erasure moved member's identity epoch: not served.
    assert await mv.read(member, IDENTIFY, b"8") == Miss(b"0")
    clock[0] = NOW + 60
    assert await mv.read(member, IDENTIFY, EPOCH) == Miss(b"0")


async def test_a_bump_between_the_read_and_the_fill_leaves_the_view_unfilled(
    redis: RedisClient, namespace: str, member: str
) -> None:
    mv = views(redis, namespace)
    miss = await mv.read(member, IDENTIFY, EPOCH)
    assert isinstance(miss, Miss)
    await mv.bump(member)  # e.g. an order committed while the services were read
    await mv.fill(member, IDENTIFY, miss, EPOCH, b'[0,"",""]', until(60))
    assert await redis.hget(views_key(namespace, member), IDENTIFY) is None
    again = await mv.read(member, IDENTIFY, EPOCH)
    assert again == Miss(b"1")
    # A fill after the bump, from a read after it, is stored.
    await mv.fill(member, IDENTIFY, again, EPOCH, b'[5,"",""]', until(60))
    assert await mv.read(member, IDENTIFY, EPOCH) == b'[5,"",""]'
    # A bump afterwards: the stored view is no longer served.
    await mv.bump(member)
    assert await mv.read(member, IDENTIFY, EPOCH) == Miss(b"2")
    assert 0 < await redis.ttl(views_key(namespace, member)) <= 3_600


@pytest.fixture
async def db(infra: Infra) -> AsyncIterator[Database]:
    pool = await create_pool(infra.database_url, 1, 3)
    database = Database(pool, "tiering", "kit-test")
    yield database
    await database.close()


@pytest.fixture
async def outbox_db(db: Database) -> AsyncIterator[Database]:
    """A private outbox (the real table's shape), so no running service's relay claims it."""
    schema = f"mv_{uuid.uuid4().hex[:8]}"
    await db.pool.execute(
        f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.outbox (LIKE tiering.outbox INCLUDING ALL)"
    )
    yield Database(db.pool, schema, f"mvp-{schema}")
    await db.pool.execute(f"DROP SCHEMA {schema} CASCADE")


async def test_the_relay_bumps_every_member_its_published_events_name(
    outbox_db: Database, redis: RedisClient, namespace: str
) -> None:
    a, b, bystander = (str(uuid.uuid4()) for _ in range(3))
    mv = views(redis, namespace)
    for m in (a, b, bystander):
        await mv.fill(m, IDENTIFY, Miss(b"0"), EPOCH, b'[1,"",""]', until(60))
    async with outbox_db.unit_of_work() as uow:
        await uow.emit(events_pb2.OrderCompleted(order_id="o1"), member_id=a)
        await uow.emit(events_pb2.OrderCompleted(order_id="o2"), member_id=b)
        await uow.emit(events_pb2.OrderCompleted(order_id="o3"), member_id=a)
        await uow.emit(events_pb2.OrderCompleted(order_id="o4"))  # names no member
    relay = OutboxRelay(outbox_db, redis, stream_name(namespace, outbox_db.producer))
    assert await relay.publish_pending() == 4
    assert await mv.read(a, IDENTIFY, EPOCH) == Miss(b"1")  # one bump per batch and member
    assert await mv.read(b, IDENTIFY, EPOCH) == Miss(b"1")
    assert await mv.read(bystander, IDENTIFY, EPOCH) == b'[1,"",""]'
    await redis.delete(stream_name(namespace, outbox_db.producer))


async def test_without_redis_every_read_misses_and_nothing_raises(member: str) -> None:
    dead = create_redis("redis://127.0.0.1:1/0")
    try:
        mv = views(dead, "nowhere")
        assert await mv.read(member, IDENTIFY, EPOCH) == Miss(None)
        await mv.fill(member, IDENTIFY, Miss(b"0"), EPOCH, b"[]", until(60))
        await mv.bump(member)
        # After the failed bump this process serves no view for the TTL.
        assert await mv.read(member, IDENTIFY, EPOCH) == Miss(None)
    finally:
        await dead.aclose()


async def test_an_unknown_epoch_is_a_miss_that_fills_nothing(
    redis: RedisClient, namespace: str, member: str
) -> None:
    """Identity epoch unreadable: nothing served, nothing stored."""
    mv = views(redis, namespace)
    miss = await mv.read(member, IDENTIFY, None)
    assert miss == Miss(None)
    await mv.fill(member, IDENTIFY, miss, None, b"[]", until(60))
    assert await redis.hget(views_key(namespace, member), VERSION) is None
    assert await redis.exists(views_key(namespace, member)) == 0


async def test_a_consumer_that_shows_in_the_views_bumps_the_members_it_applied(
    db: Database, redis: RedisClient, infra: Infra
) -> None:
    """Tiering's projection moves when its consumer applies an order, after
    rewards' relay bumped: the consumer bumps again once committed."""
    from servicekit.events import ENVELOPE_FIELD, make_envelope

    from .test_events import _drained, consumer_for, running

    tag = uuid.uuid4().hex[:8]
    producer, group = f"mvk-{tag}", f"mvg-{tag}"
    stream = stream_name(infra.namespace, producer)
    applied, other = str(uuid.uuid4()), str(uuid.uuid4())
    mv = views(redis, infra.namespace)
    for m in (applied, other):
        await mv.fill(m, IDENTIFY, Miss(b"0"), EPOCH, b'[1,"",""]', until(60))
    envelope = make_envelope(producer, events_pb2.OrderCompleted(order_id="o"), applied)
    await redis.xadd(stream, {ENVELOPE_FIELD: envelope.SerializeToString()})

    async def handler(uow: object, event: object) -> None:
        assert await mv.read(applied, IDENTIFY, EPOCH) != Miss(b"1")  # not before the commit

    consumer = consumer_for(group, db, redis, infra, producer, handler)  # type: ignore[arg-type]
    consumer.bumps_member_views = frozenset({events_pb2.OrderCompleted.DESCRIPTOR.full_name})
    async with running(consumer):
        await eventually(lambda: _drained(redis, stream, group))
    assert await mv.read(applied, IDENTIFY, EPOCH) == Miss(b"1")
    assert await mv.read(other, IDENTIFY, EPOCH) == b'[1,"",""]'
    await redis.delete(stream)
