"""ResolveMember served from Redis (services/member/cache.py), never stale:
every change to what an identifier resolves to (merge, unmerge, erase,
attach, quarantine) is seen by the very next read, and the fill protocol
refuses answers read before a commit."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from redis.asyncio import Redis

from loyalty.member.v1 import member_pb2 as pb
from servicekit.errors import NotFound, Unavailable, error_info
from servicekit.events import stream_name
from servicekit.redis_client import RedisClient, create_redis
from servicekit.server import ServiceApp
from services.member import cache as member_cache
from services.member.cache import MemberUnitOfWork, Miss, ResolveCache
from services.member.domain import IdType, normalise
from services.member.handlers import MemberHandlers
from services.member.pii import PiiVault
from services.member.policy import BlockRule, load_policy
from services.member.repository import MemberRecord
from services.member.servicer import MemberServicer
from services.member.settings import member_settings

from ..harness import Infra, eventually, own_database, wait_until_serving
from ..redis_servers import RedisClusterServers
from .test_member_oneid import CARD, OPENID, PHONE, Stub, failure, ident, identify, mobile, tag


async def resolve(stub: Stub, identifier: pb.Identifier) -> pb.Member:
    return await stub.ResolveMember(pb.ResolveMemberRequest(identifier=identifier), timeout=10)


async def unknown(stub: Stub, identifier: pb.Identifier) -> None:
    err = await failure(resolve(stub, identifier))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(err) == ("UNKNOWN_IDENTIFIER", "identifier")


@pytest.fixture(scope="module")
async def stub(member_channel: grpc.aio.Channel) -> Stub:
    return Stub(member_channel)


@pytest.fixture
async def redis(infra: Infra) -> AsyncIterator[Redis]:
    client = Redis.from_url(infra.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def any_redis(redis_url: str) -> AsyncIterator[RedisClient]:
    """The cache protocol on one Redis, then on a Redis Cluster."""
    client = create_redis(redis_url)
    yield client
    await client.aclose()


async def entry_keys(redis: Redis, infra: Infra) -> set[bytes]:
    """The cached entries (each shard's generation counter and the velocity
    watch's keys, which share the shards' tags, aside)."""
    keys = await redis.keys(f"{{{infra.namespace}:member:resolve:*")
    return {k for k in keys if not k.endswith(b":generation") and b":velocity:" not in k}


async def test_a_known_identifier_is_answered_from_redis(
    stub: Stub, redis: Redis, infra: Infra
) -> None:
    card = ident(CARD, f"c-{tag()}")
    member = (await identify(stub, card)).member
    before = await entry_keys(redis, infra)
    assert (await resolve(stub, card)).member_id == member.member_id
    (key,) = await entry_keys(redis, infra) - before
    # Overwrite the entry: the next answer comes from it, not from Postgres.
    forged = str(uuid.uuid4())
    await redis.set(
        key, json.dumps([forged, member.member_number, "", "2026-01-01T00:00:00+00:00"])
    )
    assert (await resolve(stub, card)).member_id == forged
    await redis.delete(key)
    assert (await resolve(stub, card)).member_id == member.member_id


async def test_no_entry_for_an_unknown_identifier(stub: Stub, redis: Redis, infra: Infra) -> None:
    before = await entry_keys(redis, infra)
    await unknown(stub, ident(CARD, f"nobody-{tag()}"))
    assert await entry_keys(redis, infra) == before


async def test_merge_and_unmerge_are_seen_at_once(stub: Stub) -> None:
    t = tag()
    a = (await identify(stub, ident(CARD, f"a-{t}"))).member
    b = (await identify(stub, ident(CARD, f"b-{t}"))).member
    assert (await resolve(stub, ident(CARD, f"b-{t}"))).member_id == b.member_id  # cached
    merged = await stub.MergeMembers(
        pb.MergeMembersRequest(member_ids=[a.member_id, b.member_id], operator="op", reason="r")
    )
    assert (await resolve(stub, ident(CARD, f"b-{t}"))).member_id == a.member_id
    assert (await resolve(stub, ident(CARD, f"a-{t}"))).member_id == a.member_id  # cached
    await stub.UnmergeMember(
        pb.UnmergeMemberRequest(merge_id=merged.merges[0].merge_id, operator="op", reason="r")
    )
    assert (await resolve(stub, ident(CARD, f"b-{t}"))).member_id == b.member_id
    assert (await resolve(stub, ident(CARD, f"a-{t}"))).member_id == a.member_id


async def test_a_merge_by_identify_is_seen_at_once(stub: Stub) -> None:
    t = tag()
    older = (await identify(stub, ident(OPENID, f"o-{t}"))).member
    newer = (await identify(stub, ident(CARD, f"c-{t}"))).member
    assert (await resolve(stub, ident(CARD, f"c-{t}"))).member_id == newer.member_id
    # A verified phone on both: a merge key, so identify merges them.
    phone = ident(PHONE, mobile(), verified=True)
    await identify(stub, ident(OPENID, f"o-{t}"), phone)
    reply = await identify(stub, ident(CARD, f"c-{t}"), phone)
    assert reply.merged_member_ids == [newer.member_id]
    got = await resolve(stub, ident(CARD, f"c-{t}"))
    assert got.member_id == older.member_id and got.phone_masked


async def test_a_phone_attached_later_shows_in_the_cached_answer(stub: Stub) -> None:
    card = ident(CARD, f"c-{tag()}")
    member = (await identify(stub, card)).member
    assert (await resolve(stub, card)).phone_masked == ""  # cached without a phone
    phone = mobile()
    await identify(stub, card, ident(PHONE, phone))
    got = await resolve(stub, card)
    assert got.member_id == member.member_id
    assert got.phone_masked == f"{phone[:3]}****{phone[-4:]}"


async def test_an_erased_member_is_never_served(stub: Stub) -> None:
    phone = ident(PHONE, mobile())
    member = (await identify(stub, phone)).member
    assert (await resolve(stub, phone)).member_id == member.member_id  # cached
    await stub.EraseMember(
        pb.EraseMemberRequest(member_id=member.member_id, operator="dpo", reason="PIPL")
    )
    await unknown(stub, phone)


async def test_a_quarantined_identifier_is_never_served(stub: Stub) -> None:
    t = tag()
    staff_card = ident(CARD, f"staff-{t}")
    first = (await identify(stub, ident(OPENID, f"o0-{t}"), staff_card)).member
    assert (await resolve(stub, staff_card)).member_id == first.member_id  # cached
    reply = None
    for n in range(1, 4):
        own = ident(OPENID, f"o{n}-{t}")
        await identify(stub, own)
        reply = await identify(stub, own, staff_card)
    assert reply is not None and [(i.index, i.reason) for i in reply.ignored] == [
        (1, "QUARANTINED")
    ]
    await unknown(stub, staff_card)


def _record() -> MemberRecord:
    return MemberRecord(str(uuid.uuid4()), "M1", datetime(2026, 1, 1, tzinfo=UTC), "")


async def test_an_answer_read_before_a_commit_is_not_filled(
    any_redis: RedisClient, infra: Infra
) -> None:
    cache = ResolveCache(any_redis, f"{infra.namespace}-unit-{tag()}")
    value_hash = uuid.uuid4().bytes
    miss = await cache.get(value_hash)
    assert isinstance(miss, Miss) and miss.generation is not None
    # A write to this identifier commits between the read and the fill.
    await cache.fence([value_hash])
    assert await cache.get(value_hash) == Miss(None)  # fenced: a miss, no fill
    await cache.release([value_hash])
    await cache.fill(value_hash, _record(), miss)
    assert isinstance(await cache.get(value_hash), Miss)
    # A read after the commit fills normally.
    record = _record()
    await cache.fill(value_hash, record, await cache.get(value_hash))
    assert await cache.get(value_hash) == record


async def test_a_fill_never_replaces_a_fence(any_redis: RedisClient, infra: Infra) -> None:
    cache = ResolveCache(any_redis, f"{infra.namespace}-unit-{tag()}")
    value_hash = uuid.uuid4().bytes
    miss = await cache.get(value_hash)
    await cache.fence([value_hash])
    await cache.fill(value_hash, _record(), miss)
    assert await any_redis.get(cache.key(value_hash)) == member_cache.FENCE


async def test_a_till_read_answers_and_counts_a_hit_and_counts_no_miss_nor_fence(
    any_redis: RedisClient, infra: Infra
) -> None:
    """get_counting, on one Redis and on a cluster (one slot: no CROSSSLOT,
    which would fall back to Postgres): a hit is answered and its store
    counted; a miss keeps the generation for the fill and a fence forbids it,
    neither counted (the caller counts once Postgres named the member)."""
    from services.member.velocity import VelocityWatch

    namespace = f"{infra.namespace}-unit-{tag()}"
    cache = ResolveCache(any_redis, namespace)
    watch = VelocityWatch(any_redis, namespace, 2, 600, lambda: datetime(2026, 3, 2, tzinfo=UTC))
    value_hash = uuid.uuid4().bytes
    stores_key = watch.keys(value_hash)[0]

    def at(store: str) -> Any:
        return cache.get_counting(
            value_hash, watch.keys(value_hash), watch.args(store, watch.now())
        )

    missed, seen = await at("S1")
    assert missed == Miss(b"0") and seen is None
    record = _record()
    await cache.fill(value_hash, record, missed)
    assert await at("S1") == (record, [0, 1])
    # The second store crosses the threshold (2): this observation starts the burst.
    assert await at("S2") == (record, [1, 2, b"S1", b"S2"])
    assert await at("S3") == (record, [0, 3])
    await cache.fence([value_hash])
    assert await at("S4") == (Miss(None), None)
    assert await any_redis.zcard(stores_key) == 3  # S4 not counted


async def test_a_write_over_several_shards_fences_and_releases_each(
    any_redis: RedisClient, infra: Infra
) -> None:
    """A merge touches identifiers in several shards (several slots on a
    cluster): each is fenced before the commit, each shard's generation moves
    after it (so a fill read before it fails), and the identity epoch moves
    at both steps."""
    namespace = f"{infra.namespace}-unit-{tag()}"
    cache = ResolveCache(any_redis, namespace)
    hashes = [bytes([first]) + uuid.uuid4().bytes for first in (0x00, 0x5A, 0xC3)]
    assert len({cache.shard(h) for h in hashes}) == 3
    misses = [await cache.get(h) for h in hashes]
    epoch = member_cache.identity_epoch_key(namespace)
    await cache.fence(hashes, regrouped=True)
    assert [await any_redis.get(cache.key(h)) for h in hashes] == [member_cache.FENCE] * 3
    assert await any_redis.get(epoch) == b"1"
    await cache.release(hashes, regrouped=True)
    assert [await any_redis.get(cache.key(h)) for h in hashes] == [None] * 3
    assert await any_redis.get(epoch) == b"2"
    for h, miss in zip(hashes, misses, strict=True):
        assert await any_redis.get(cache.generation_key(h)) == b"1"
        await cache.fill(h, _record(), miss)  # read before the commit: refused
        assert isinstance(await cache.get(h), Miss)


async def test_a_write_the_cache_cannot_hear_of_is_rolled_back(
    stub: Stub, member_app: ServiceApp
) -> None:
    assert member_app.db is not None
    member = (await identify(stub, ident(CARD, f"c-{tag()}"))).member
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    unit_of_work = MemberUnitOfWork(member_app.db, ResolveCache(dead, "nowhere"))
    try:
        with pytest.raises(Unavailable):
            async with unit_of_work() as uow:
                await uow.conn.execute(
                    "UPDATE member.members SET phone_masked = 'changed' WHERE id = $1",
                    uuid.UUID(member.member_id),
                )
                await member_cache.touch(uow.conn, [member.member_id])
    finally:
        await dead.aclose()
    got = await stub.GetMember(pb.GetMemberRequest(member_id=member.member_id))
    assert got.phone_masked == member.phone_masked == ""


async def test_an_identifier_blocklisted_after_it_was_stored_resolves_nobody(
    stub: Stub, member_app: ServiceApp, infra: Infra
) -> None:
    """The POS path (ResolveMember first) answers junk as identify does: the
    gateway gets UNKNOWN_IDENTIFIER, goes on to IdentifyMember, which refuses it."""
    assert member_app.db is not None
    value = f"c-{tag()}"
    member = (await identify(stub, ident(CARD, value))).member
    s = member_settings(infra.service_settings())
    policy = load_policy()
    vault = PiiVault(s.pii_key)
    observed = normalise(IdType.POS_CARD, value, "", False, "identifier.value")
    listed = replace(policy, blocklist=(*policy.blocklist, BlockRule(IdType.POS_CARD, value)))
    async with member_app.db.unit_of_work() as uow:
        found = await MemberHandlers(vault, policy, b"x").resolve_identifier(uow, observed)
        assert found.member_id == member.member_id
        with pytest.raises(NotFound) as caught:
            await MemberHandlers(vault, listed, b"x").resolve_identifier(uow, observed)
    assert caught.value.code == "UNKNOWN_IDENTIFIER"
    # Nor from Redis: the answer was cached before the blocklist listed it.
    assert member_app.redis is not None
    await resolve(stub, ident(CARD, value))  # cached now
    servicer = MemberServicer(
        member_app.db,
        MemberHandlers(vault, listed, b"x"),
        cache=ResolveCache(member_app.redis, infra.namespace),
    )
    with pytest.raises(NotFound) as cached:
        await servicer.ResolveMember(pb.ResolveMemberRequest(identifier=ident(CARD, value)), None)  # type: ignore[arg-type]
    assert cached.value.code == "UNKNOWN_IDENTIFIER"


async def test_reads_fall_back_to_postgres_without_redis() -> None:
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    try:
        cache = ResolveCache(dead, "nowhere")
        value_hash = uuid.uuid4().bytes
        miss = await cache.get(value_hash)
        assert miss == Miss(None)  # a miss that fills nothing
        await cache.fill(value_hash, _record(), Miss(b"0"))  # logged, not raised
    finally:
        await dead.aclose()


async def test_the_member_service_runs_on_a_redis_cluster(
    redis_cluster: RedisClusterServers, infra: Infra
) -> None:
    """A whole service takes REDIS_URL=redis+cluster://... as it takes one
    Redis (servicekit's factory): its outbox relay publishes to its stream, its
    resolve cache fills and is invalidated, all on the cluster."""
    namespace = f"{infra.namespace}-cl-{tag()}"
    # Its own database: on the shared one the session's member service relays
    # the same outbox, and could publish this test's event to its own stream.
    async with own_database(infra, "member") as database_url:
        await _serve_member_on_cluster(redis_cluster, infra, database_url, namespace)


async def _serve_member_on_cluster(
    redis_cluster: RedisClusterServers, infra: Infra, database_url: str, namespace: str
) -> None:
    from services.member.server import build

    app = build(
        infra.service_settings(
            database_url=database_url, redis_url=redis_cluster.url, redis_namespace=namespace
        )
    )
    port = await app.start()
    client = create_redis(redis_cluster.url)
    try:
        await wait_until_serving(f"127.0.0.1:{port}")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = Stub(channel)
            card = ident(CARD, f"c-{tag()}")
            member = (await identify(stub, card)).member
            assert (await resolve(stub, card)).member_id == member.member_id
            assert (await resolve(stub, card)).member_id == member.member_id
            entries = [
                k
                async for k in client.scan_iter(match=f"{{{namespace}:member:resolve:*")
                if not k.endswith(b":generation") and b":velocity:" not in k
            ]
            assert len(entries) == 1  # the answer is cached on the cluster
            stream = stream_name(namespace, "member")
            assert await eventually(lambda: client.xlen(stream))  # the relay published
    finally:
        await client.aclose()
        await app.stop()


async def test_the_member_scripts_are_on_every_cluster_node_before_the_first_call(
    redis_cluster: RedisClusterServers, infra: Infra
) -> None:
    """At start the member service loads the resolve cache's and the velocity
    watch's Lua scripts on every primary (servicekit preload_scripts, as the
    gateway's gatekeeper), so the first calls do not each meet NOSCRIPT."""
    from services.member import cache as cache_module
    from services.member import velocity as velocity_module
    from services.member.server import build

    shas = [
        hashlib.sha1(script.encode()).hexdigest()
        for script in (
            cache_module._FILL,
            cache_module._FENCE,
            cache_module._RELEASE,
            velocity_module._OBSERVE,
        )
    ]
    client = create_redis(redis_cluster.url)
    try:
        # Forget what earlier tests loaded (on every primary).
        await client.script_flush()
        assert await client.script_exists(*shas) == [False] * len(shas)
        app = build(
            infra.service_settings(
                redis_url=redis_cluster.url, redis_namespace=f"{infra.namespace}-sc-{tag()}"
            )
        )
        await app.start()
        try:
            assert await app.scripts_loaded  # type: ignore[attr-defined]
            # No member call was made: the scripts are there on every primary.
            assert await client.script_exists(*shas) == [True] * len(shas)
        finally:
            await app.stop()
    finally:
        await client.aclose()
