"""Token buckets in Redis, and the one round trip every authenticated call
makes: in a single Lua script (atomic, so two gateway instances never both
spend the last token), it records the nonce (SET NX), takes a token from the
client's bucket and, for a POS, from its store's bucket, and reads the
credential revocation epoch.

A bucket holds `burst` tokens and refills at `rate` per second; time is
Redis's own clock (TIME), so gateway instances with skewed clocks agree.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from servicekit.errors import Unavailable

log = logging.getLogger(__name__)

# KEYS: 1 nonce, 2 client bucket, 3 store bucket, 4 revocation epoch
# ARGV: 1 nonce ttl ms (0: no nonce), 2 client rate/s, 3 client burst,
#       4 store rate/s (0: no store bucket), 5 store burst
# Returns {nonce_fresh 0/1, retry_after_ms (0: allowed), epoch}
_SCRIPT = """
local epoch = tonumber(redis.call('GET', KEYS[4]) or '0')
local nonce_ttl = tonumber(ARGV[1])
if nonce_ttl > 0 then
  if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', nonce_ttl) then
    return {0, 0, epoch}
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function peek(key, rate, burst)
  local s = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens, ts = tonumber(s[1]), tonumber(s[2])
  if tokens == nil then return burst end
  return math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
end
local buckets = {}
local wait = 0
for i, key in ipairs({KEYS[2], KEYS[3]}) do
  local rate, burst = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  if rate > 0 then
    local tokens = peek(key, rate, burst)
    if tokens < 1 then
      wait = math.max(wait, math.ceil((1 - tokens) * 1000 / rate))
    end
    buckets[#buckets + 1] = {key, tokens, rate, burst}
  end
end
if wait > 0 then return {1, wait, epoch} end
for _, b in ipairs(buckets) do
  -- string.format keeps the fraction: a bucket refills continuously
  redis.call('HSET', b[1], 'tokens', string.format('%.6f', b[2] - 1), 'ts', now)
  redis.call('PEXPIRE', b[1], math.ceil(b[4] * 1000 / b[3]) + 1000)
end
return {1, 0, epoch}
"""


def epoch_key(namespace: str) -> str:
    """Bumped by every credential change (gateway/auth/admin.py)."""
    return f"{namespace}:auth:epoch"


@dataclass(frozen=True)
class Limit:
    rate_per_second: float
    burst: int


@dataclass(frozen=True)
class Verdict:
    nonce_fresh: bool
    retry_after_ms: int
    epoch: int

    @property
    def allowed(self) -> bool:
        return self.retry_after_ms == 0

    @property
    def retry_after_seconds(self) -> int:
        """For HTTP Retry-After, which counts whole seconds."""
        return max(1, math.ceil(self.retry_after_ms / 1000))


class Gatekeeper:
    """The per-call Redis round trip (nonce + rate limit + revocation epoch)."""

    def __init__(self, redis: Redis, namespace: str) -> None:
        self._redis = redis
        self._script = redis.register_script(_SCRIPT)
        self._ns = namespace
        self.epoch_key = epoch_key(namespace)

    async def admit(
        self,
        client_id: str,
        client_limit: Limit | None,
        *,
        nonce: str = "",
        nonce_ttl_ms: int = 0,
        store_id: str = "",
        store_limit: Limit | None = None,
    ) -> Verdict:
        """`client_limit` None: the client is not known yet (only the epoch and
        the nonce matter). `nonce` is already scoped by the caller's key id."""
        client = client_limit or Limit(0, 0)
        store = store_limit if store_id and store_limit else Limit(0, 0)
        keys = [
            f"{self._ns}:auth:nonce:{nonce}",
            f"{self._ns}:rl:client:{client_id}",
            f"{self._ns}:rl:store:{store_id}",
            self.epoch_key,
        ]
        args = [
            nonce_ttl_ms if nonce else 0,
            client.rate_per_second,
            client.burst,
            store.rate_per_second,
            store.burst,
        ]
        try:
            fresh, wait, epoch = await self._script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            # Fail closed: without Redis no nonce or limit can be checked.
            log.warning("gatekeeper: redis unavailable: %r", exc)
            raise Unavailable(
                "the gateway cannot check credentials right now; retry later",
                code="DEPENDENCY_UNAVAILABLE",
            ) from None
        return Verdict(bool(fresh), int(wait), int(epoch))

    async def current_epoch(self) -> int:
        return int(await self._redis.get(self.epoch_key) or 0)
