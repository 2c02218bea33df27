"""The gatekeeper's Redis state on one Redis and on a Redis Cluster
(gateway/ratelimit.py): per-client nonce-store epochs (set at start, carried
over from the earlier single epoch, re-set when lost), and buckets that never
hand out more than they hold under concurrent calls."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio.cluster import RedisCluster

from gateway.auth.door import REDIS_CONNECTIONS
from gateway.auth.members import identity_epoch_key
from gateway.auth.model import ClientKind, Credential
from gateway.auth.signin import Attempt, SignIn, SignInSettings
from gateway.known_members import KnownMembers
from gateway.ratelimit import (
    NONCE_BEFORE_EPOCH,
    NONCE_FRESH,
    NONCE_REPLAYED,
    Gatekeeper,
    Limit,
    legacy_nonce_epoch_key,
    nonce_epoch_key,
)
from servicekit.redis_client import RedisClient, create_bounded_redis

NOW = 1_900_000_000.0  # the gateway's clock in these tests (seconds)
SIGNED_BEFORE = int(NOW) - 10
SIGNED_AFTER = int(NOW) + 10


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[RedisClient]:
    # As the gateway's door makes it: a bounded pool a burst waits on.
    client = create_bounded_redis(redis_url, REDIS_CONNECTIONS, 5.0)
    yield client
    await client.aclose()


@pytest.fixture
def namespace() -> str:
    return f"gk-{uuid.uuid4().hex[:8]}"


def gatekeeper(redis: RedisClient, namespace: str) -> Gatekeeper:
    return Gatekeeper(redis, namespace, clock=lambda: NOW)


async def signed(gate: Gatekeeper, client: str, timestamp: int) -> int:
    verdict = await gate.admit(
        client,
        Limit(100, 100),
        nonce=f"k_1:{uuid.uuid4().hex}",
        nonce_ttl_ms=600_000,
        timestamp=timestamp,
    )
    return verdict.nonce


async def test_an_upgrade_carries_the_single_epoch_over_to_every_client(
    redis: RedisClient, namespace: str
) -> None:
    legacy = int(NOW * 1000) - 5_000  # the earlier version's store epoch
    await redis.set(legacy_nonce_epoch_key(namespace), legacy)
    gate = gatekeeper(redis, namespace)
    await gate.open_nonce_store(False, ["a", "b"])
    for client in ("a", "b"):
        assert int(await redis.get(nonce_epoch_key(namespace, client))) == legacy  # type: ignore[arg-type]
    assert await redis.get(legacy_nonce_epoch_key(namespace)) is None  # carried over once
    assert await signed(gate, "a", SIGNED_BEFORE) == NONCE_BEFORE_EPOCH
    assert await signed(gate, "a", SIGNED_AFTER) == NONCE_FRESH


async def test_a_fresh_install_and_new_clients_start_at_zero_and_epochs_are_kept(
    redis: RedisClient, namespace: str
) -> None:
    gate = gatekeeper(redis, namespace)
    await gate.open_nonce_store(True, ["a"])
    await gate.open_client("new")
    assert await signed(gate, "a", SIGNED_BEFORE) == NONCE_FRESH
    assert await signed(gate, "new", SIGNED_BEFORE) == NONCE_FRESH
    # A later start (not fresh) keeps what is there.
    await gate.open_nonce_store(False, ["a", "new"])
    assert await redis.get(nonce_epoch_key(namespace, "a")) == b"0"


async def test_a_client_whose_epoch_is_lost_trusts_only_later_signatures(
    redis: RedisClient, namespace: str
) -> None:
    gate = gatekeeper(redis, namespace)
    await gate.open_nonce_store(True, ["a", "b"])
    nonce = "k_1:captured"
    verdict = await gate.admit(
        "a", Limit(100, 100), nonce=nonce, nonce_ttl_ms=600_000, timestamp=SIGNED_BEFORE
    )
    assert verdict.nonce == NONCE_FRESH
    again = await gate.admit(
        "a", Limit(100, 100), nonce=nonce, nonce_ttl_ms=600_000, timestamp=SIGNED_BEFORE
    )
    assert again.nonce == NONCE_REPLAYED
    # The slot holding client a's keys loses them (its node failed over empty).
    keys = [k async for k in redis.scan_iter(match=f"{{{namespace}:auth:client:a}}:*")]
    assert len(keys) >= 2
    for key in keys:
        await redis.delete(key)
    replay = await gate.admit(
        "a", Limit(100, 100), nonce=nonce, nonce_ttl_ms=600_000, timestamp=SIGNED_BEFORE
    )
    assert replay.nonce == NONCE_BEFORE_EPOCH
    assert await signed(gate, "a", SIGNED_AFTER) == NONCE_FRESH
    # Another client's store was not lost.
    assert await signed(gate, "b", SIGNED_BEFORE) == NONCE_FRESH


async def test_concurrent_calls_never_take_more_than_the_buckets_hold(
    redis: RedisClient, namespace: str
) -> None:
    """200 concurrent POS calls of two tills of one store whose bucket holds
    30 (each till's own holds more): exactly 30 pass, in one slot per store."""
    gate = gatekeeper(redis, namespace)
    await gate.load_script()  # as the door does at start
    store = Limit(rate_per_second=0.001, burst=30)
    verdicts = await asyncio.gather(
        *(
            gate.admit(f"till-{i % 2}", Limit(0.001, 100), store_id="SH9", store_limit=store)
            for i in range(200)
        )
    )
    assert sum(v.allowed for v in verdicts) == 30
    assert all(v.retry_after_ms > 0 for v in verdicts if not v.allowed)


async def test_the_admission_reads_members_identity_epoch_on_one_redis(
    redis: RedisClient, namespace: str
) -> None:
    """On one Redis the script hands back member's identity epoch (no GET of
    its own for the member checks after it); on a cluster the key is in
    another slot, so it is not read there and the checks GET it."""
    key = identity_epoch_key(namespace)
    gate = Gatekeeper(redis, namespace, clock=lambda: NOW, identity_epoch_key=key)
    first = await gate.admit("a", Limit(100, 100))
    if isinstance(redis, RedisCluster):
        assert gate.identity_key is None and first.identity_epoch is None
        return
    assert first.identity_epoch == b"0"  # never bumped: absent, as IdentityEpoch reads it
    await redis.incr(key)
    await redis.incr(key)
    assert (await gate.admit("a", Limit(100, 100))).identity_epoch == b"2"
    # Without the key named (an older door), nothing is read.
    assert (await gatekeeper(redis, namespace).admit("a", Limit(100, 100))).identity_epoch is None


async def test_a_member_check_after_sign_in_uses_the_epoch_its_admission_read(
    redis: RedisClient, namespace: str
) -> None:
    """The POS path: sign-in, then the known-members check of the same request
    reads the epoch the admission read; another request (another task) reads
    its own."""
    key = identity_epoch_key(namespace)
    gate = Gatekeeper(redis, namespace, clock=lambda: NOW, identity_epoch_key=key)
    credential = Credential("k_1", "pos-1", ClientKind.POS, "SH1", frozenset(), "secret")

    class Registry:
        def get(self, key_id: str) -> Credential | None:
            return credential if key_id == "k_1" else None

        def is_current(self, epoch: int | None) -> bool:
            return True

    signin = SignIn(
        Registry(),  # type: ignore[arg-type]
        gate,
        SignInSettings(600_000, {"pos": Limit(100, 100)}, Limit(100, 100), Limit(1, 1)),
    )
    known = KnownMembers(redis, namespace)
    await redis.set(key, 5)

    async def request() -> tuple[bytes | None, bytes | None]:
        attempt = Attempt("k_1", lambda c: None, "x-api-key", store_id="SH1")
        await signin.sign_in("127.0.0.1", lambda: attempt)
        before = await known.epoch()
        await redis.incr(key)  # an erasure commits meanwhile
        return before, await known.epoch()

    seen = await asyncio.create_task(request())
    if isinstance(redis, RedisCluster):
        assert seen == (b"5", b"6")  # each check GETs the epoch
    else:
        assert seen == (b"5", b"5")  # no GET: the admission's value
        # The next request's admission reads the epoch afresh.
        assert (await asyncio.create_task(request()))[0] == b"6"
    # Outside any request, a GET as before.
    assert await known.epoch() == (b"6" if isinstance(redis, RedisCluster) else b"7")
