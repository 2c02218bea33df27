"""The velocity watch: how many distinct stores each identifier was presented at
within a sliding window, counted in Redis, and when a burst crosses the
threshold (VELOCITY_STORES within VELOCITY_WINDOW_SECONDS).

One sorted set per identifier (keyed by its lookup hash: no personal data in
Redis), member = store id, score = when it was last presented there, in
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

from redis.exceptions import RedisError

from servicekit.redis_client import RedisClient

log = logging.getLogger(__name__)

# KEYS[1] the identifier's stores, KEYS[2] its burst (last over-threshold time).
# ARGV: now (ms), window (ms), threshold, store, key lifetime (ms), oldest kept (ms).
# Returns {1, count, store...} when this observation starts a burst, else {0, count}.
_OBSERVE = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local seen = redis.call('ZSCORE', KEYS[1], ARGV[4])
if (not seen) or tonumber(seen) < now then
  redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
local count = redis.call('ZCARD', KEYS[1])
if count < tonumber(ARGV[3]) then
  return {0, count}
end
local last = redis.call('GET', KEYS[2])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[5])
if last and now - tonumber(last) <= window then
  return {0, count}
end
local result = {1, count}
for _, store in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  table.insert(result, store)
end
return result
"""

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
        self._prefix = f"{namespace}:member:velocity:"
        self._clock = clock
        self._observe = redis.register_script(_OBSERVE)
        self.scripts = [self._observe]

    def _keys(self, sighting: Sighting) -> list[str]:
        # The lookup hash already covers type, namespace and value; as the hash
        # tag it puts both keys the script touches in one Redis Cluster slot.
        key = self._prefix + "{" + sighting.value_hash.hex() + "}"
        return [key + ":stores", key + ":burst"]

    async def observe(self, sightings: list[Sighting], store_id: str) -> list[Burst]:
        """Count these identifiers at this store; the ones whose burst starts now."""
        at = self._clock()
        now_ms = int(at.timestamp() * 1000)
        window_ms = self.window_seconds * 1000
        bursts = []
        for sighting in sightings:
            try:
                reply = await self._observe(
                    keys=self._keys(sighting),
                    args=[
                        now_ms,
                        window_ms,
                        self.stores,
                        store_id,
                        window_ms + KEY_SLACK_MS,
                        now_ms - window_ms,
                    ],
                )
            except RedisError as exc:
                log.warning("velocity not counted (%s): %s", sighting.id_type, exc)
                continue
            if int(reply[0]) == 1:
                stores = [s.decode() if isinstance(s, bytes) else str(s) for s in reply[2:]]
                bursts.append(Burst(sighting, sorted(stores), at))
        return bursts

    async def forget(self, burst: Burst) -> None:
        """The flag of this burst was not written: let the next observation flag."""
        try:
            await self._redis.delete(self._keys(burst.sighting)[1])
        except RedisError as exc:
            log.warning("velocity burst not cleared: %s", exc)
