"""Token buckets in Redis, and the one round trip a verified call makes: in a
single Lua script (atomic, so two gateway instances never both spend the last
token), it checks the nonce store's epoch, records the nonce (SET NX) and
takes a token from the client's bucket and, for a POS, from its store's
bucket; the credential revocation epoch is read beside it, concurrently.

Redis Cluster: the keys of one script share a hash tag, so one slot: the
store's for a POS call (`{<ns>:auth:store:<store>}`: its bucket and the POS
client's), the client's otherwise (`{<ns>:auth:client:<client>}`: its bucket,
its nonces and its nonce-store epoch). The revocation epoch is one key of its
own: on one Redis the script reads it too (one round trip), on a cluster a
GET of its own goes beside the script. So callers spread over the slots, and
no script touches two. On one Redis the script also reads member's identity
epoch (gateway/auth/members.py) when the door names its key: the member
checks after admission (the POS's known members, the mini-program's member
assertions) then need no GET of their own, one round trip fewer per call.

A bucket holds `burst` tokens and refills at `rate` per second; time is
Redis's own clock (TIME), so gateway instances with skewed clocks agree.

The script runs only for a principal whose signature / key was verified
(gateway/auth/signin.py): unauthenticated traffic never writes to Redis.

Also here: `LocalBuckets`, the same bucket in process memory, bounded. It is
the budget of failed sign-ins per source address, and the fallback for
calls that need no nonce (POS, bearer tokens) while Redis is unreachable.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from servicekit.redis_client import RedisClient, load_scripts, tagged

log = logging.getLogger(__name__)

# Nonce outcomes of the script.
NONCE_FRESH = 1
NONCE_REPLAYED = 0
# X-Timestamp is not after the moment the nonce store was last known empty:
# a nonce recorded before a Redis loss may be gone, so the request may be a replay.
NONCE_BEFORE_EPOCH = 2

# KEYS (one hash tag, gate_keys): 1 nonce, 2 client bucket, 3 store bucket,
#       4 the nonce-store epoch of the tag; on one Redis only, 5 the revocation
#       epoch (read here: no second command; a cluster reads it with a GET),
#       and 6 (optional) member's identity epoch, read for the handler
# ARGV: 1 nonce ttl ms (0: no nonce), 2 client rate/s, 3 client burst,
#       4 store rate/s (0: no store bucket), 5 store burst, 6 X-Timestamp (s),
#       7 the gateway's clock (ms), the one X-Timestamp is checked against
# Returns {nonce outcome, retry_after_ms (0: allowed), revocation epoch or -1,
#          identity epoch ('0' when absent; only with KEYS[6], when admitted)}
_SCRIPT = """
local epoch = -1
if #KEYS >= 5 then
  epoch = tonumber(redis.call('GET', KEYS[5]) or '0')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local nonce_ttl = tonumber(ARGV[1])
if nonce_ttl > 0 then
  -- The nonce store's epoch is set when the gateway starts (Gatekeeper.open);
  -- missing now, the store lost its data: it is empty from this moment on.
  local since = redis.call('GET', KEYS[4])
  if not since then
    since = ARGV[7]
    redis.call('SET', KEYS[4], since)
  end
  if tonumber(ARGV[6]) * 1000 <= tonumber(since) then
    return {2, 0, epoch}
  end
  if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', nonce_ttl) then
    return {0, 0, epoch}
  end
end
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
if #KEYS >= 6 then
  return {1, 0, epoch, redis.call('GET', KEYS[6]) or '0'}
end
return {1, 0, epoch}
"""


# How long calls go to the fallback without trying Redis after it failed.
SKIP_AFTER_FAILURE_SECONDS = 0.5


def epoch_key(namespace: str) -> str:
    """Bumped by every credential change (gateway/auth/admin.py)."""
    return f"{namespace}:auth:epoch"


def legacy_nonce_epoch_key(namespace: str) -> str:
    """The one nonce-store epoch of earlier versions: read once at start, so
    the per-client epochs carry its value on."""
    return f"{namespace}:auth:nonce-epoch"


def gate_tag(namespace: str, client_id: str, store_id: str = "") -> str:
    """The hash tag of one call's keys: its store's for a POS call, else its client's."""
    return tagged(
        f"{namespace}:auth:store:{store_id}" if store_id else f"{namespace}:auth:client:{client_id}"
    )


def nonce_epoch_key(namespace: str, client_id: str) -> str:
    """Unix ms since which the client's nonces are known complete (no expiry).
    One per client, in the slot of its nonces: a cluster node that lost its
    data lost the epochs of the clients it held with their nonces."""
    return f"{gate_tag(namespace, client_id)}:nonce-epoch"


def gate_keys(namespace: str, client_id: str, nonce: str, store_id: str) -> list[str]:
    """The script's KEYS for one call, all under one hash tag."""
    tag = gate_tag(namespace, client_id, store_id)
    return [
        f"{tag}:nonce:{nonce}",
        f"{tag}:rl:client:{client_id}",
        f"{tag}:rl:store",
        f"{tag}:nonce-epoch",
    ]


@dataclass(frozen=True)
class Limit:
    rate_per_second: float
    burst: int


@dataclass(frozen=True)
class Verdict:
    nonce: int
    retry_after_ms: int
    epoch: int | None
    # Member's identity epoch read with the admission (None: not read).
    identity_epoch: bytes | None = None

    @property
    def nonce_fresh(self) -> bool:
        return self.nonce == NONCE_FRESH

    @property
    def allowed(self) -> bool:
        return self.retry_after_ms == 0

    @property
    def retry_after_seconds(self) -> int:
        """For HTTP Retry-After, which counts whole seconds."""
        return max(1, math.ceil(self.retry_after_ms / 1000))


class StoreUnreachable(Exception):
    """Redis did not answer the gatekeeper's round trip."""


class LocalBuckets:
    """Token buckets in this process, at most `max_entries` of them (the least
    recently used go first, so a flood of new keys cannot grow memory)."""

    def __init__(
        self, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._max = max_entries
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, key: str, limit: Limit, now: float) -> float:
        found = self._buckets.get(key)
        if found is None:
            return float(limit.burst)
        tokens, at = found
        return min(float(limit.burst), tokens + (now - at) * limit.rate_per_second)

    def wait_ms(self, key: str, limit: Limit) -> int:
        """0 when a token is there; otherwise how long until one is (takes nothing)."""
        tokens = self._tokens(key, limit, self._clock())
        if tokens >= 1:
            return 0
        return max(1, math.ceil((1 - tokens) * 1000 / limit.rate_per_second))

    def spend(self, key: str, limit: Limit) -> None:
        """Take a token (or go into debt by one: a failure is always counted)."""
        now = self._clock()
        tokens = self._tokens(key, limit, now)
        self._buckets[key] = (max(tokens - 1, -1.0), now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)

    def take(self, pairs: list[tuple[str, Limit]]) -> int:
        """All or nothing over several buckets: 0 and one token from each, or
        the longest wait and nothing taken."""
        wait = max((self.wait_ms(key, limit) for key, limit in pairs), default=0)
        if wait == 0:
            for key, limit in pairs:
                self.spend(key, limit)
        return wait


class Gatekeeper:
    """The per-call Redis round trip (nonce + rate limit + revocation epoch)."""

    def __init__(
        self,
        redis: RedisClient,
        namespace: str,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        epoch_in_script: bool | None = None,
        identity_epoch_key: str | None = None,
    ) -> None:
        self._redis = redis
        # The gateway's clock: X-Timestamp is checked against it, so the
        # nonce store's epoch is taken from it too (buckets use Redis's).
        self._clock = clock
        # After a failed round trip, calls skip Redis until then (monotonic):
        # a hung Redis costs one caller its timeout, not every caller.
        self._skip_until = 0.0
        self._monotonic = monotonic
        self._script = redis.register_script(_SCRIPT)
        self._ns = namespace
        self.epoch_key = epoch_key(namespace)
        # On one Redis the script reads the revocation epoch; on a cluster it
        # is in another slot than the call's keys.
        self.epoch_in_script = (
            not isinstance(redis, RedisCluster) if epoch_in_script is None else epoch_in_script
        )
        # Read in the script on one Redis only (another slot on a cluster).
        self.identity_key = identity_epoch_key if self.epoch_in_script else None

    async def admit(
        self,
        client_id: str,
        client_limit: Limit | None,
        *,
        nonce: str = "",
        nonce_ttl_ms: int = 0,
        timestamp: int = 0,
        store_id: str = "",
        store_limit: Limit | None = None,
    ) -> Verdict:
        """Only for a verified principal. `nonce` is already scoped by the
        caller's key id; `timestamp` is its X-Timestamp (seconds). Raises
        StoreUnreachable when Redis does not answer."""
        client = client_limit or Limit(0, 0)
        store = store_limit if store_id and store_limit else Limit(0, 0)
        keys = gate_keys(self._ns, client_id, nonce, store_id)
        args = [
            nonce_ttl_ms if nonce else 0,
            client.rate_per_second,
            client.burst,
            store.rate_per_second,
            store.burst,
            timestamp,
            int(self._clock() * 1000),
        ]
        if self._monotonic() < self._skip_until:
            raise StoreUnreachable
        identity: bytes | None = None
        try:
            if self.epoch_in_script:
                keys.append(self.epoch_key)
                if self.identity_key is not None:
                    keys.append(self.identity_key)
                outcome, wait, epoch, *read = await self._script(keys=keys, args=args)
                if read:
                    identity = read[0] if isinstance(read[0], bytes) else str(read[0]).encode()
            else:
                # Concurrent, not in the script: the epoch is one key for every
                # client, so in a cluster it lives in another slot than theirs.
                replies: tuple[Any, ...] = await asyncio.gather(
                    self._script(keys=keys, args=args),
                    self._redis.get(self.epoch_key),
                    return_exceptions=True,  # both awaited, whichever fails
                )
                for failed in replies:
                    if isinstance(failed, BaseException):
                        raise failed
                (outcome, wait, _), epoch = replies
        except (RedisError, OSError) as exc:
            log.warning("gatekeeper: redis unavailable: %r", exc)
            self._skip_until = self._monotonic() + SKIP_AFTER_FAILURE_SECONDS
            raise StoreUnreachable from exc
        return Verdict(int(outcome), int(wait), int(epoch or 0), identity)

    async def load_script(self) -> None:
        """Load the script on every node before traffic does: otherwise a
        burst's first calls all find it missing (NOSCRIPT) and all load it,
        every call to every node of a cluster at once."""
        await load_scripts(self._redis, [self._script])

    async def current_epoch(self) -> int | None:
        """The revocation epoch; None when Redis does not answer (or failed a
        moment ago: an unauthenticated flood during an outage neither waits on
        Redis nor fills the log)."""
        if self._monotonic() < self._skip_until:
            return None
        try:
            return int(await self._redis.get(self.epoch_key) or 0)
        except (RedisError, OSError) as exc:
            log.warning("gatekeeper: redis unavailable reading the epoch: %r", exc)
            self._skip_until = self._monotonic() + SKIP_AFTER_FAILURE_SECONDS
            return None

    async def open_nonce_store(self, fresh_install: bool, client_ids: Iterable[str]) -> None:
        """At start: a client's nonces without its epoch key are lost (or it
        never had any). On a fresh install none existed (epoch 0); after an
        upgrade each client takes the earlier single epoch; otherwise the
        store lost its data while no gateway ran, and only requests signed
        from now on are safe. Existing epochs are kept (SET NX)."""
        legacy = await self._redis.get(legacy_nonce_epoch_key(self._ns))
        now_ms = int(self._clock() * 1000)
        since = 0 if fresh_install else int(legacy) if legacy is not None else now_ms
        ids = sorted(set(client_ids))
        set_now = 0
        if ids:
            # Not a transaction: each SET has its own slot; a cluster pipeline
            # sends each node its share.
            async with self._redis.pipeline(transaction=False) as pipe:
                for client_id in ids:
                    pipe.set(nonce_epoch_key(self._ns, client_id), since, nx=True)
                set_now = sum(1 for done in await pipe.execute() if done)
        if legacy is not None:
            # Carried over once: a client whose epoch goes missing later lost it.
            await self._redis.delete(legacy_nonce_epoch_key(self._ns))
        if set_now:
            log.warning(
                "nonce store epoch set to %s for %d of %d clients",
                "0 (fresh install)" if fresh_install else f"{since}",
                set_now,
                len(ids),
            )

    async def open_client(self, client_id: str) -> None:
        """A new client has no nonce to lose: its epoch is 0 (kept if set)."""
        await self._redis.set(nonce_epoch_key(self._ns, client_id), 0, nx=True)
