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

Reads fail open: without Redis, ResolveMember reads Postgres as before.
Entries expire after ENTRY_TTL_SECONDS anyway, a bound on any staleness a
lost invalidation could leave.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime

from redis.asyncio import Redis
from redis.exceptions import RedisError

from servicekit.db import Connection, Database, UnitOfWork
from servicekit.errors import Unavailable

from . import oneid_repository as oneid_repo
from .repository import MemberRecord

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
# KEYS: 1 identity epoch, 2.. the entries; ARGV: 1 fence ttl s, 2 '1' to bump the epoch
_FENCE = """
if ARGV[2] == '1' then
  redis.call('INCR', KEYS[1])
end
for i = 2, #KEYS do
  redis.call('SET', KEYS[i], '-', 'EX', ARGV[1])
end
return #KEYS - 1
"""
# KEYS: 1 generation, 2 identity epoch, 3.. the entries; ARGV: 1 '1' to bump the epoch
_RELEASE = """
redis.call('INCR', KEYS[1])
if ARGV[1] == '1' then
  redis.call('INCR', KEYS[2])
end
for i = 3, #KEYS do
  redis.call('DEL', KEYS[i])
end
return #KEYS - 2
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
        redis: Redis,
        namespace: str,
        ttl_seconds: int = ENTRY_TTL_SECONDS,
        fence_ttl_seconds: int = FENCE_TTL_SECONDS,
    ) -> None:
        self._redis = redis
        self._prefix = f"{namespace}:member:resolve:"
        self._generation = f"{namespace}:member:resolve-generation"
        self._epoch = identity_epoch_key(namespace)
        self._ttl = ttl_seconds
        self._fence_ttl = fence_ttl_seconds
        self._fill = redis.register_script(_FILL)
        self._fence = redis.register_script(_FENCE)
        self._release = redis.register_script(_RELEASE)

    def key(self, value_hash: bytes) -> str:
        # The lookup hash already covers type, namespace and value (domain key).
        return self._prefix + value_hash.hex()

    async def get(self, value_hash: bytes) -> MemberRecord | Miss:
        try:
            raw, generation = await self._redis.mget(self.key(value_hash), self._generation)
        except (RedisError, OSError) as exc:
            log.warning("resolve cache unavailable, reading Postgres: %r", exc)
            return Miss(None)
        if raw is None:
            return Miss(generation or b"0")
        if raw == FENCE:
            return Miss(None)
        return _decode(raw)

    async def fill(self, value_hash: bytes, member: MemberRecord, miss: Miss) -> None:
        if miss.generation is None:
            return
        try:
            await self._fill(
                keys=[self.key(value_hash), self._generation],
                args=[miss.generation, _encode(member), self._ttl],
            )
        except (RedisError, OSError) as exc:
            log.warning("resolve cache: fill failed: %r", exc)

    async def fence(self, hashes: Iterable[bytes], regrouped: bool = False) -> None:
        """Before COMMIT: raises Unavailable (the transaction rolls back) if Redis
        cannot be told."""
        keys = sorted({self.key(h) for h in hashes})
        if not keys and not regrouped:
            return
        try:
            await self._fence(
                keys=[self._epoch, *keys], args=[self._fence_ttl, "1" if regrouped else "0"]
            )
        except (RedisError, OSError) as exc:
            log.warning("resolve cache: cannot fence %d entries: %r", len(keys), exc)
            raise Unavailable(
                "the member cache cannot be invalidated right now; retry later",
                code="DEPENDENCY_UNAVAILABLE",
            ) from None

    async def release(self, hashes: Iterable[bytes], regrouped: bool = False) -> None:
        """After COMMIT: best effort (the fences expire on their own)."""
        keys = sorted({self.key(h) for h in hashes})
        try:
            await self._release(
                keys=[self._generation, self._epoch, *keys], args=["1" if regrouped else "0"]
            )
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
