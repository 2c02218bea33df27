"""The velocity watch: how many distinct stores each identifier was presented at
within a sliding window, counted in Redis, and when a burst crosses the
threshold (VELOCITY_STORES within VELOCITY_WINDOW_SECONDS).

One sorted set per identifier (keyed by its lookup hash: no personal data in
Redis; under the identifier's resolve cache shard tag, so that
cache.ResolveCache.get_counting answers a cached identifier and counts it in
one script), member = store id, score = when it was last presented there, in
milliseconds of the service's clock (never Redis's or the database's, so
tests pin it and a shifted clock changes nothing). One script per observation
adds the store, drops stores older than the window, counts the rest and
decides, atomically, whether this observation starts a burst: the first count
at or over the threshold after none for a whole window. A burst is flagged
once, however many stores follow; its end is a window without an
over-threshold count. Concurrent observations are serialised by Redis, so two
tills crossing together flag once.

The flag itself (row and IdentifierVelocityFlagged event) is written by the
servicer through OneIdHandlers.flag_velocity; if that write fails, `forget`
clears the burst so the next observation flags again. Redis unavailable:
nothing is counted (logged), identification goes on: flag, never block.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from redis.exceptions import RedisError

from servicekit.redis_client import RedisClient, tagged

log = logging.getLogger(__name__)

# The observation as a Lua function, so that member's resolve cache can count
# a known identifier in the same script that answers it (cache.py,
# ResolveCache.get_counting). stores, burst: the identifier's two keys.
# a: now (ms), window (ms), threshold, store, key lifetime (ms), oldest kept (ms).
# Returns {1, count, store...} when this observation starts a burst, else {0, count}.
OBSERVE_FUNCTION = """
local function observe(stores, burst, a)
  local now = tonumber(a[1])
  local window = tonumber(a[2])
  local seen = redis.call('ZSCORE', stores, a[4])
  if (not seen) or tonumber(seen) < now then
    redis.call('ZADD', stores, a[1], a[4])
  end
  redis.call('ZREMRANGEBYSCORE', stores, '-inf', '(' .. a[6])
  redis.call('PEXPIRE', stores, a[5])
  local count = redis.call('ZCARD', stores)
  if count < tonumber(a[3]) then
    return {0, count}
  end
  local last = redis.call('GET', burst)
  redis.call('SET', burst, a[1], 'PX', a[5])
  if last and now - tonumber(last) <= window then
    return {0, count}
  end
  local result = {1, count}
  for _, store in ipairs(redis.call('ZRANGE', stores, 0, -1)) do
    table.insert(result, store)
  end
  return result
end
"""

# KEYS[1] the identifier's stores, KEYS[2] its burst (last over-threshold time);
# ARGV as `a` above.
_OBSERVE = OBSERVE_FUNCTION + "return observe(KEYS[1], KEYS[2], ARGV)\n"


def identifier_shard(namespace: str, value_hash: bytes) -> str:
    """The hash tag of an identifier's shard (256, by the first byte of its
    lookup hash): its resolve cache entry and generation (cache.py) and its
    two velocity keys, so one script may answer and count it (one slot)."""
    return tagged(f"{namespace}:member:resolve:{value_hash[:1].hex()}")


# Keys outlive the window by this much (Redis's own clock); the window itself
# is decided by the scores, on the service's clock.
KEY_SLACK_MS = 60_000


@dataclass(frozen=True)
class Sighting:
    """One identifier presented at a till."""

    id_type: str
    namespace: str
    value_hash: bytes
    value_masked: str


@dataclass(frozen=True)
class Burst:
    """An identifier that has just crossed the threshold."""

    sighting: Sighting
    store_ids: list[str]
    at: datetime


class VelocityWatch:
    def __init__(
        self,
        redis: RedisClient,
        namespace: str,
        stores: int,
        window_seconds: int,
        clock: Callable[[], datetime],
    ) -> None:
        self.stores = stores
        self.window_seconds = window_seconds
        self._redis = redis
        self._namespace = namespace
        self._clock = clock
        self._observe = redis.register_script(_OBSERVE)
        self.scripts = [self._observe]

    def keys(self, value_hash: bytes) -> list[str]:
        """The identifier's stores and burst keys. The lookup hash already
        covers type, namespace and value; the tag is its resolve shard's
        (identifier_shard), so both keys, and its resolve cache entry, are in
        one Redis Cluster slot."""
        key = f"{identifier_shard(self._namespace, value_hash)}:velocity:{value_hash.hex()}"
        return [key + ":stores", key + ":burst"]

    def _keys(self, sighting: Sighting) -> list[str]:
        return self.keys(sighting.value_hash)

    def now(self) -> datetime:
        return self._clock()

    def args(self, store_id: str, at: datetime) -> list[int | str]:
        """The observation's arguments (`a` in OBSERVE_FUNCTION) for a sighting at `at`."""
        now_ms = int(at.timestamp() * 1000)
        window_ms = self.window_seconds * 1000
        return [
            now_ms,
            window_ms,
            self.stores,
            store_id,
            window_ms + KEY_SLACK_MS,
            now_ms - window_ms,
        ]

    @staticmethod
    def burst(sighting: Sighting, reply: list[Any], at: datetime) -> Burst | None:
        """The burst an observation's reply ({flag, count, store...}) starts, if any."""
        if int(reply[0]) != 1:
            return None
        stores = [s.decode() if isinstance(s, bytes) else str(s) for s in reply[2:]]
        return Burst(sighting, sorted(stores), at)

    async def observe(self, sightings: list[Sighting], store_id: str) -> list[Burst]:
        """Count these identifiers at this store; the ones whose burst starts now."""
        at = self._clock()
        args = self.args(store_id, at)
        bursts = []
        for sighting in sightings:
            try:
                reply = await self._observe(keys=self._keys(sighting), args=args)
            except RedisError as exc:
                log.warning("velocity not counted (%s): %s", sighting.id_type, exc)
                continue
            burst = self.burst(sighting, reply, at)
            if burst is not None:
                bursts.append(burst)
        return bursts

    async def forget(self, burst: Burst) -> None:
        """The flag of this burst was not written: let the next observation flag."""
        try:
            await self._redis.delete(self._keys(burst.sighting)[1])
        except RedisError as exc:
            log.warning("velocity burst not cleared: %s", exc)
