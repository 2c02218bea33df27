"""Redis Cluster key layout: the keys one Lua script or MULTI touches share a
hash slot (computed with redis-py's own `key_slot`, as the cluster does), and
the tags still spread the load (per stream, per client / store, per cache
shard; no single tag for everything). The scripts are driven through their
real callers with a recording client, so a key added to a script later is
checked too. The suites on a real local cluster (tests/conftest.py
`redis_cluster`) prove the same end to end: the cluster refuses a command
spanning slots (CROSSSLOT)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.ratelimit import Gatekeeper, Limit, gate_keys, nonce_epoch_key
from servicekit.events import dead_letter_stream, head_key, replay_key, stream_name
from servicekit.redis_client import create_redis, is_cluster, slot_of
from services.member.cache import Miss, ResolveCache
from services.member.repository import MemberRecord

PRODUCERS = ["member", "rewards", "tiering", "engagement", "guides"]


class _ScriptRecorder:
    """Stands in for the client: records the KEYS of every script call."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def register_script(self, source: str) -> Any:
        async def run(keys: list[str], args: list[Any] | None = None) -> Any:
            self.calls.append(list(keys))
            return [1, 0, -1]

        return run

    async def get(self, key: str) -> Any:
        return None

    async def mget(self, *keys: str) -> list[Any]:
        assert len({slot_of(k) for k in keys}) == 1, keys  # MGET spans no slot either
        return [None, b"0"]

    async def incr(self, key: str) -> int:
        return 1


def _one_slot(keys: list[str]) -> bool:
    return len({slot_of(k) for k in keys}) == 1


def test_a_stream_and_its_keys_share_its_slot_and_streams_spread() -> None:
    for namespace in ("loyalty", "test-1a2b3c", "brand.eu"):
        slots = set()
        for producer in PRODUCERS:
            stream = stream_name(namespace, producer)
            keys = [stream, head_key(stream), replay_key(stream)]
            keys += [dead_letter_stream(namespace, producer, group) for group in PRODUCERS]
            assert _one_slot(keys), keys
            slots.add(slot_of(stream))
        assert len(slots) == len(PRODUCERS)  # one slot per producer's stream


async def test_each_gatekeeper_script_call_stays_in_one_slot() -> None:
    recorder = _ScriptRecorder()
    # As on a cluster: the revocation epoch (another slot) is not a script key.
    gate = Gatekeeper(recorder, "loyalty", epoch_in_script=False)  # type: ignore[arg-type]
    clients = [f"pos-{uuid.uuid4().hex[:8]}" for _ in range(50)]
    for i, client in enumerate(clients):
        await gate.admit(client, Limit(10, 10), nonce=f"k_{i}:n{i}", nonce_ttl_ms=600_000)
        await gate.admit(client, Limit(10, 10), store_id=f"SH{i:03d}", store_limit=Limit(5, 5))
    assert len(recorder.calls) == 2 * len(clients)
    for keys in recorder.calls:
        assert _one_slot(keys), keys
    # The nonce-store epoch a signed call's script reads is the client's own.
    for client in clients:
        assert nonce_epoch_key("loyalty", client) in gate_keys("loyalty", client, "n", "")
    # Per client and per store: spread over many slots, not one for all.
    assert len({slot_of(keys[0]) for keys in recorder.calls}) > len(clients)


async def test_each_member_cache_script_call_stays_in_one_slot() -> None:
    recorder = _ScriptRecorder()
    cache = ResolveCache(recorder, "loyalty")  # type: ignore[arg-type]
    hashes = [uuid.uuid4().bytes + bytes([b]) for b in range(64)] + [
        bytes([b]) + uuid.uuid4().bytes for b in range(256)
    ]
    record = MemberRecord(str(uuid.uuid4()), "M1", datetime(2026, 1, 1, tzinfo=UTC), "")
    for h in hashes[:40]:
        await cache.get(h)
        await cache.fill(h, record, Miss(b"0"))
    await cache.fence(hashes, regrouped=True)
    await cache.release(hashes, regrouped=True)
    assert recorder.calls
    for keys in recorder.calls:
        assert _one_slot(keys), keys
    # 256 shards: the entries spread over (nearly) as many slots.
    assert len({slot_of(cache.key(h)) for h in hashes}) > 200


def test_cluster_urls_name_their_nodes() -> None:
    assert is_cluster("redis+cluster://10.0.0.1:7000,10.0.0.2:7000/0")
    assert is_cluster("rediss+cluster://user:pw@redis.example:6380")
    assert not is_cluster("redis://127.0.0.1:6379/0")
    with pytest.raises(ValueError, match="database 0"):
        create_redis("redis+cluster://10.0.0.1:7000/3")
    with pytest.raises(ValueError, match="not host:port"):
        create_redis("redis+cluster://10.0.0.1:7000,nohost/0")


class _EvalRecorder:
    """Records the KEYS of every EVAL (the SMS phone guard's calls)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    async def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any:
        self.calls.append([str(k) for k in keys_and_args[:numkeys]])
        return 0


async def test_the_velocity_watch_script_keys_share_one_slot_per_identifier() -> None:
    from services.member.velocity import Sighting, VelocityWatch

    recorder = _ScriptRecorder()
    watch = VelocityWatch(
        recorder,  # type: ignore[arg-type]
        "loyalty",
        stores=5,
        window_seconds=600,
        clock=lambda: datetime(2026, 3, 1, tzinfo=UTC),
    )
    cache = ResolveCache(recorder, "loyalty")  # type: ignore[arg-type]
    hashes = [bytes([n * 5]) + uuid.uuid4().bytes for n in range(50)]
    for n, value_hash in enumerate(hashes):
        sighting = Sighting("phone", "cn", value_hash, f"138****{n:04d}")
        await watch.observe([sighting], "S001")
    assert all(_one_slot(keys) and len(keys) == 2 for keys in recorder.calls)
    assert len({slot_of(keys[0]) for keys in recorder.calls}) == 50  # spread by identifier
    # In the slot of the identifier's resolve cache entry: one script may
    # answer a known identifier and count its store (ResolveCache.get_counting).
    for value_hash, keys in zip(hashes, recorder.calls, strict=True):
        assert _one_slot([cache.key(value_hash), cache.generation_key(value_hash), *keys])
    recorder.calls.clear()
    for value_hash in hashes:
        args = watch.args("S001", watch.now())
        await cache.get_counting(value_hash, watch.keys(value_hash), args)
    assert all(_one_slot(keys) and len(keys) == 4 for keys in recorder.calls)


async def test_the_sms_phone_guard_keys_share_one_slot_per_phone() -> None:
    from services.engagement.domain import FakeClock
    from services.engagement.providers import PhoneGuard

    recorder = _EvalRecorder()
    guard = PhoneGuard(
        recorder,  # type: ignore[arg-type]
        "loyalty",
        [(1, 60), (5, 3600), (10, 86400)],
        FakeClock(datetime(2026, 3, 1, 9, tzinfo=UTC)),
    )
    for n in range(50):
        assert await guard.admit(f"+86138{n:08d}") is None
    assert all(_one_slot(keys) and len(keys) == 3 for keys in recorder.calls)
    assert len({slot_of(keys[0]) for keys in recorder.calls}) > 40


async def test_the_member_views_fill_touches_one_key_and_members_spread() -> None:
    from servicekit.member_views import IDENTIFY, MemberViews
    from servicekit.member_views import Miss as ViewMiss

    recorder = _ScriptRecorder()
    views = MemberViews(recorder, "loyalty", 60)  # type: ignore[arg-type]
    members = [str(uuid.uuid4()) for _ in range(64)]
    for member in members:
        await views.fill(
            member, IDENTIFY, ViewMiss(b"0"), b"1", b"[]", datetime(2031, 1, 1, tzinfo=UTC)
        )
    assert all(len(keys) == 1 for keys in recorder.calls)
    assert len({slot_of(keys[0]) for keys in recorder.calls}) > 32  # one tag per member
