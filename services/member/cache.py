"""Known-identifier lookups (ResolveMember) served from Redis; Postgres stays
the truth.

An entry maps one identifier (its keyed lookup hash) to the live member that
owns it, as ResolveMember answers: id, member number, masked phone,
registration time. Entries are filled on a miss, after the answer was read from
Postgres, and never for "nobody owns it" (a new identifier must enrol at once).

Every transaction that can change an answer (identify attaching, verifying or
quarantining; merge; unmerge; erase) names the members and identifiers it
touched (`touch`). Then, around its commit (`MemberUnitOfWork`):

1. before COMMIT, still inside the transaction, each touched identifier's entry
   is replaced by a fence (`-`, expiring after FENCE_TTL_SECONDS). A fence is
   a miss that may not be filled, so nobody caches the pre-commit state while
   the commit is under way. If Redis cannot be told, the transaction rolls back
   (UNAVAILABLE): a write is never committed behind a cache that would keep
   serving the old answer;
2. after COMMIT, the fences are deleted and the generation counter is bumped
   in one script.

A filler reads the generation with the entry (one MGET), reads Postgres, and
sets the entry only if the generation is unchanged and the key is still empty
(one script). So a filler whose Postgres read predates a commit cannot store
it after step 2 (the generation moved), nor between 1 and 2 (the fence is
there). If step 2 fails, the fences expire on their own and entries of the
touched identifiers simply stay unfilled until then.

A merge, unmerge or erasure also bumps the **identity epoch** (a counter the
gateway reads on each mini-program request: gateway/auth/members.py keeps
openid -> member and member -> survivor answers only while it is unchanged),
in step 1 (so the gateway stops trusting what it cached before the commit)
and again in step 2 (so an answer it re-read while the commit was under way
is not kept either).

Redis Cluster: entries are spread over 256 shards by the first byte of their
lookup hash; a shard's entries and its generation counter share one hash tag
(`{<ns>:member:resolve:<2 hex>}`), so a fill (entry + generation) and a
release (generation + fences) each touch one slot. The generation is per
shard: a filler only ever races with commits touching its own entry, which
bump that entry's shard. Fences and releases go out per shard, concurrently;
the identity epoch is a key of its own, bumped beside them.

A POS read (a store named) of a cached identifier is one script: the entry
read and, on a hit, the velocity observation (velocity.py; its keys share the
entry's shard tag). A miss or a fence counts nothing there: the caller counts
once Postgres named the member.

Reads fail open: without Redis, ResolveMember reads Postgres as before.
Entries expire after ENTRY_TTL_SECONDS anyway, a bound on any staleness a
lost invalidation could leave.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from redis.exceptions import RedisError

from servicekit.db import Connection, Database, UnitOfWork
from servicekit.errors import Unavailable
from servicekit.redis_client import RedisClient

from . import oneid_repository as oneid_repo
from .repository import MemberRecord
from .velocity import OBSERVE_FUNCTION, identifier_shard

log = logging.getLogger(__name__)

ENTRY_TTL_SECONDS = 300
# Longer than any commit takes; the fence is deleted right after the commit.
FENCE_TTL_SECONDS = 30
FENCE = b"-"

# KEYS: 1 entry, 2 generation; ARGV: 1 generation read with the miss, 2 value, 3 ttl s
_FILL = """
if (redis.call('GET', KEYS[2]) or '0') == ARGV[1] and redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"""
# A POS read of a known identifier, answered and counted in one round trip.
# KEYS: 1 entry, 2 generation, 3 and 4 the identifier's velocity keys (same
# shard: velocity.identifier_shard); ARGV: the observation's (velocity.py).
# Returns {0, generation} on a miss, {1} when fenced (neither is counted
# here: the caller counts once the member is known), else {2, entry,
# observe's reply...}.
_GET_COUNTING = (
    OBSERVE_FUNCTION
    + """
local raw = redis.call('GET', KEYS[1])
if not raw then
  return {0, redis.call('GET', KEYS[2]) or '0'}
end
if raw == '-' then
  return {1}
end
local result = {2, raw}
for _, v in ipairs(observe(KEYS[3], KEYS[4], ARGV)) do
  table.insert(result, v)
end
return result
"""
)
# KEYS: the entries of one shard; ARGV: 1 fence ttl s
_FENCE = """
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], '-', 'EX', ARGV[1])
end
return #KEYS
"""
# KEYS: 1 the shard's generation, 2.. its entries
_RELEASE = """
redis.call('INCR', KEYS[1])
for i = 2, #KEYS do
  redis.call('DEL', KEYS[i])
end
return #KEYS - 1
"""


def identity_epoch_key(namespace: str) -> str:
    """Read by the gateway (gateway/auth/members.py, the same name there)."""
    return f"{namespace}:member:identity-epoch"


@dataclass(frozen=True)
class Miss:
    """What a miss remembers for the fill: the generation it read, or None
    when the entry was fenced (a write is committing: do not fill)."""

    generation: bytes | str | None


def _encode(member: MemberRecord) -> str:
    return json.dumps(
        [
            member.member_id,
            member.member_number,
            member.phone_masked,
            member.registered_at.isoformat(),
        ]
    )


def _decode(raw: bytes | str) -> MemberRecord:
    member_id, number, masked, registered = json.loads(raw)
    return MemberRecord(member_id, number, datetime.fromisoformat(registered), masked)


class ResolveCache:
    def __init__(
        self,
        redis: RedisClient,
        namespace: str,
        ttl_seconds: int = ENTRY_TTL_SECONDS,
        fence_ttl_seconds: int = FENCE_TTL_SECONDS,
    ) -> None:
        self._redis = redis
        self._namespace = namespace
        self._epoch = identity_epoch_key(namespace)
        self._ttl = ttl_seconds
        self._fence_ttl = fence_ttl_seconds
        self._fill = redis.register_script(_FILL)
        self._fence = redis.register_script(_FENCE)
        self._release = redis.register_script(_RELEASE)
        self._get_counting = redis.register_script(_GET_COUNTING)
        # Loaded at the service's start (servicekit.redis_client.preload_scripts).
        self.scripts = [self._fill, self._fence, self._release, self._get_counting]

    def shard(self, value_hash: bytes) -> str:
        """The hash tag of an entry's shard (the entry and its generation;
        the identifier's velocity keys too)."""
        return identifier_shard(self._namespace, value_hash)

    def key(self, value_hash: bytes) -> str:
        # The lookup hash already covers type, namespace and value (domain key).
        return f"{self.shard(value_hash)}:{value_hash.hex()}"

    def generation_key(self, value_hash: bytes) -> str:
        return f"{self.shard(value_hash)}:generation"

    def _by_shard(self, hashes: Iterable[bytes]) -> dict[str, tuple[str, list[str]]]:
        """shard -> (its generation key, its entries' keys, sorted)."""
        shards: dict[str, tuple[str, list[str]]] = {}
        for h in sorted(set(hashes)):
            shards.setdefault(self.shard(h), (self.generation_key(h), []))[1].append(self.key(h))
        return shards

    async def _all(self, calls: list[Awaitable[object]]) -> None:
        """Await every call (concurrently); then raise the first failure."""
        for outcome in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome

    async def get(self, value_hash: bytes) -> MemberRecord | Miss:
        try:
            raw, generation = await self._redis.mget(
                self.key(value_hash), self.generation_key(value_hash)
            )
        except (RedisError, OSError) as exc:
            log.warning("resolve cache unavailable, reading Postgres: %r", exc)
            return Miss(None)
        if raw is None:
            return Miss(generation or b"0")
        if raw == FENCE:
            return Miss(None)
        return _decode(raw)

    async def get_counting(
        self, value_hash: bytes, velocity_keys: list[str], velocity_args: list[int | str]
    ) -> tuple[MemberRecord | Miss, list[Any] | None]:
        """As `get`; a hit also runs the velocity observation (its reply
        second), in the same script: one round trip for a known identifier
        presented at a till. A miss counts nothing (None): the caller counts
        once Postgres named the member."""
        try:
            reply = await self._get_counting(
                keys=[self.key(value_hash), self.generation_key(value_hash), *velocity_keys],
                args=velocity_args,
            )
        except (RedisError, OSError) as exc:
            log.warning("resolve cache unavailable, reading Postgres: %r", exc)
            return Miss(None), None
        kind = int(reply[0])
        if kind == 2:
            return _decode(reply[1]), reply[2:]
        return Miss(reply[1] if kind == 0 else None), None

    async def fill(self, value_hash: bytes, member: MemberRecord, miss: Miss) -> None:
        if miss.generation is None:
            return
        try:
            await self._fill(
                keys=[self.key(value_hash), self.generation_key(value_hash)],
                args=[miss.generation, _encode(member), self._ttl],
            )
        except (RedisError, OSError) as exc:
            log.warning("resolve cache: fill failed: %r", exc)

    async def fence(self, hashes: Iterable[bytes], regrouped: bool = False) -> None:
        """Before COMMIT: raises Unavailable (the transaction rolls back) if Redis
        cannot be told."""
        shards = self._by_shard(hashes)
        calls: list[Awaitable[object]] = [
            self._fence(keys=keys, args=[self._fence_ttl]) for _, keys in shards.values()
        ]
        if regrouped:
            calls.append(self._redis.incr(self._epoch))
        if not calls:
            return
        try:
            await self._all(calls)
        except (RedisError, OSError) as exc:
            log.warning("resolve cache: cannot fence %d shards: %r", len(shards), exc)
            raise Unavailable(
                "the member cache cannot be invalidated right now; retry later",
                code="DEPENDENCY_UNAVAILABLE",
            ) from None

    async def release(self, hashes: Iterable[bytes], regrouped: bool = False) -> None:
        """After COMMIT: best effort (the fences expire on their own)."""
        shards = self._by_shard(hashes)
        calls: list[Awaitable[object]] = [
            self._release(keys=[generation, *keys]) for generation, keys in shards.values()
        ]
        if regrouped:
            calls.append(self._redis.incr(self._epoch))
        try:
            await self._all(calls)
        except (RedisError, OSError) as exc:
            log.warning(
                "resolve cache: release failed, fences expire in %ds: %r", self._fence_ttl, exc
            )


@dataclass
class Touched:
    members: set[str] = field(default_factory=set)
    hashes: set[bytes] = field(default_factory=set)
    # A merge, unmerge or erasure: who is whom changed (the identity epoch moves).
    regrouped: bool = False

    def __bool__(self) -> bool:
        return bool(self.members or self.hashes or self.regrouped)


_touched: ContextVar[Touched | None] = ContextVar("member_cache_touched", default=None)


async def touch(
    conn: Connection, member_ids: Iterable[str] = (), hashes: Iterable[bytes] = ()
) -> None:
    """Record that this transaction changed what these members' identifiers (and
    these identifiers) resolve to. The members' identifiers are read now (an
    erasure deletes them next) and again before commit (attached meanwhile).
    Outside a MemberUnitOfWork (no cache) nothing is recorded."""
    touched = _touched.get()
    if touched is None:
        return
    ids = set(member_ids) - touched.members
    touched.members |= ids
    touched.hashes |= set(hashes)
    if ids:
        touched.hashes |= set(await oneid_repo.identity_hashes(conn, ids))


def regroup() -> None:
    """Record that this transaction merges, unmerges or erases members: the
    gateway's openid and survivor answers must not outlive its commit."""
    touched = _touched.get()
    if touched is not None:
        touched.regrouped = True


class MemberUnitOfWork:
    """The service's units of work: a servicekit transaction, with the cache
    fenced before and released after its commit when it touched anything."""

    def __init__(self, db: Database, cache: ResolveCache | None) -> None:
        self._db = db
        self._cache = cache

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[UnitOfWork]:
        if self._cache is None:
            async with self._db.unit_of_work() as uow:
                yield uow
            return
        touched = Touched()
        token = _touched.set(touched)
        try:
            async with self._db.unit_of_work() as uow:
                yield uow
                if touched:
                    touched.hashes |= set(
                        await oneid_repo.identity_hashes(uow.conn, touched.members)
                    )
                    await self._cache.fence(touched.hashes, touched.regrouped)
        finally:
            _touched.reset(token)
        if touched:
            await self._cache.release(touched.hashes, touched.regrouped)
