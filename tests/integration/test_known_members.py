"""The gateway's record of member ids member confirmed (gateway/known_members.py),
against a real Redis: trusted only under the identity epoch it was filled
under, so a merge, unmerge or erasure (which bump the epoch) ends it; nothing
is trusted when the epoch cannot be read, or when the entry has expired."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from devtools.supervisor import free_port
from gateway.auth.members import identity_epoch_key
from gateway.known_members import KnownMembers

from ..harness import Infra


@pytest.fixture
async def redis(infra: Infra) -> AsyncIterator[Redis]:
    client = Redis.from_url(infra.redis_url)
    yield client
    await client.aclose()


async def test_an_id_is_trusted_until_the_epoch_moves(redis: Redis) -> None:
    namespace = f"known-{uuid.uuid4().hex[:8]}"
    known = KnownMembers(redis, namespace)
    member = str(uuid.uuid4())
    epoch = await known.epoch()
    assert epoch == b"0"  # no erasure or merge yet: the counter is absent
    assert not known.confirmed(epoch, member)
    known.remember(epoch, member)
    assert known.confirmed(await known.epoch(), member)
    assert not known.confirmed(await known.epoch(), str(uuid.uuid4()))
    # What member does around an erasure's commit.
    await redis.incr(identity_epoch_key(namespace))
    assert not known.confirmed(await known.epoch(), member)
    # Confirmed again under the new epoch (member was asked again).
    now = await known.epoch()
    known.remember(now, member)
    assert known.confirmed(await known.epoch(), member)


async def test_nothing_is_trusted_without_redis() -> None:
    unreachable = Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    known = KnownMembers(unreachable, "known")
    member = str(uuid.uuid4())
    known.remember(b"0", member)
    assert await known.epoch() is None
    assert not known.confirmed(None, member)
    # Without a Redis at all (auth off), likewise: member is asked every time.
    none = KnownMembers(None, "known")
    none.remember(await none.epoch(), member)
    assert not none.confirmed(await none.epoch(), member)
    await unreachable.aclose()


async def test_an_entry_expires(redis: Redis) -> None:
    now = [1000.0]
    known = KnownMembers(
        redis, f"known-{uuid.uuid4().hex[:8]}", ttl_seconds=300, clock=lambda: now[0]
    )
    member = str(uuid.uuid4())
    epoch = await known.epoch()
    known.remember(epoch, member)
    now[0] += 299
    assert known.confirmed(epoch, member)
    now[0] += 2
    assert not known.confirmed(epoch, member)
