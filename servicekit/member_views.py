"""Per-member read views the gateway keeps in Redis (issue 19): the POS
identify's balance and tier badge, the member centre's whole reply.

One Redis hash per member, `{<ns>:member-views:<member id>}` (the whole name
is its hash tag, so every command below touches one slot on a cluster):

- `v`: the member's version, a counter bumped whenever something the views show
  may have changed: by every producer's outbox relay for each published event
  whose envelope names the member (servicekit/outbox.py, in the XADD's
  pipeline, after commit), by tiering's consumer after it applied an event for
  the member and rewards' after a merge, unmerge or erasure (their
  projections moved: servicekit/consumer.py), and by the
  gateway after every member-scoped write it routes (read-your-writes);
- one field per view: `<version>|<identity epoch>|<valid until, epoch ms>|<body>`.

A read is one HMGET (version and view). A view is served only when it was
stored under the current version, under the current identity epoch (member
bumps it around every merge, unmerge and erasure: gateway/auth/members.py) and
before its valid-until. A miss remembers the version it read; the fill stores
the view only if the version is still that one (one script), so a view read
from the services before a bump is never stored after it.

Valid-until: a tier view changes with time alone (the window slides at local
midnight, periods, grace and overrides end; points expire), so a view is kept
until the earliest of now + the TTL setting, the next local midnight and every
boundary it names itself (`valid_until`).

Reads fail open: without Redis (or for SKIP_AFTER_FAILURE_SECONDS after a
failure) the gateway asks the services as before and stores nothing. The hash
expires KEY_TTL_SECONDS after its last bump or fill; a lost version (Redis
restarted empty) can only lose views, and a view never outlives its
valid-until.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from redis.exceptions import RedisError

from loyalty.events.v1 import events_pb2

from .redis_client import RedisClient, tagged

log = logging.getLogger(__name__)

# Garbage collection of the hash; longer than any view's TTL (the setting is
# capped below it) and than any fill takes.
KEY_TTL_SECONDS = 3_600
MAX_VIEW_TTL_SECONDS = 3_000
SKIP_AFTER_FAILURE_SECONDS = 5.0
VERSION = b"v"
IDENTIFY = b"identify"
CENTRE = b"centre"

# KEYS: 1 the member's hash; ARGV: 1 version read with the miss, 2 field, 3 value, 4 key ttl s
_FILL = """
if (redis.call('HGET', KEYS[1], 'v') or '0') == ARGV[1] then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  return 1
end
return 0
"""

# KEYS: 1 the member's hash; ARGV: 1 key ttl s. One command for the gateway's
# bump of one member (a pipeline of two cost it more client CPU per order).
_BUMP = """
redis.call('HINCRBY', KEYS[1], 'v', 1)
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


def views_key(namespace: str, member_id: str) -> str:
    return tagged(f"{namespace}:member-views:{member_id}")


def namespace_of_stream(stream: str) -> str:
    """The namespace of a producer's stream (servicekit/events.py stream_name)."""
    return stream.rpartition(":events:")[0]


def bump(pipe: Any, namespace: str, member_ids: Iterable[str]) -> None:
    """Queue the version bumps of these members on a pipeline (not sent here)."""
    for member_id in sorted(set(member_ids)):
        if member_id:
            key = views_key(namespace, member_id)
            pipe.hincrby(key, VERSION, 1)
            pipe.expire(key, KEY_TTL_SECONDS)


def bump_for_envelopes(pipe: Any, stream: str, envelopes: Iterable[bytes]) -> None:
    """The relay's part: bump every member an event of this batch names."""
    members = set()
    for raw in envelopes:
        envelope = events_pb2.EventEnvelope()
        try:
            envelope.ParseFromString(bytes(raw))
        except Exception:  # an unreadable envelope is the consumers' to dead-letter
            continue
        members.add(envelope.member_id)
    bump(pipe, namespace_of_stream(stream), members)


def next_local_midnight(now: datetime, tz: ZoneInfo) -> datetime:
    """The next 00:00 in `tz` after `now` (aware), as an aware datetime."""
    local = now.astimezone(tz)
    day = local.date() + timedelta(days=1)
    return datetime(day.year, day.month, day.day, tzinfo=tz)


def valid_until(
    now: datetime, ttl_seconds: float, tz: ZoneInfo, boundaries: Iterable[datetime | None] = ()
) -> datetime:
    """Until when a view read at `now` may be served: the earliest of now + the
    TTL, the next local midnight (the window slides, periods end) and every
    future boundary the view names (an override's or grace's end, an expiry)."""
    until = min(now + timedelta(seconds=ttl_seconds), next_local_midnight(now, tz))
    for boundary in boundaries:
        if boundary is not None and now < boundary < until:
            until = boundary
    return until


@dataclass(frozen=True)
class Miss:
    """A view not served: the version read with it, or None (do not fill:
    Redis failed, or the identity epoch is unknown)."""

    version: bytes | None


class MemberViews:
    """The gateway's side: read, fill, bump (fail open)."""

    def __init__(
        self,
        redis: RedisClient,
        namespace: str,
        ttl_seconds: float,
        timezone: str = "Asia/Shanghai",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._namespace = namespace
        self.ttl_seconds = min(ttl_seconds, MAX_VIEW_TTL_SECONDS)
        self.tz = ZoneInfo(timezone)
        self.clock = clock
        self._skip_until = 0.0
        self._fill = redis.register_script(_FILL)
        self._bump = redis.register_script(_BUMP)
        self.scripts = [self._fill, self._bump]

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def _failed(self, what: str, exc: BaseException) -> None:
        self._skip_until = time.monotonic() + SKIP_AFTER_FAILURE_SECONDS
        log.warning("member views: %s failed, asking the services: %r", what, exc)

    async def read(self, member_id: str, view: bytes, epoch: bytes | None) -> bytes | Miss:
        """The stored body, or a Miss."""
        if epoch is None or not member_id or time.monotonic() < self._skip_until:
            return Miss(None)
        try:
            # Bytes: every client the platform makes has decode_responses off.
            found: list[Any] = await self._redis.hmget(
                views_key(self._namespace, member_id), [VERSION, view]
            )
        except (RedisError, OSError) as exc:
            self._failed("read", exc)
            return Miss(None)
        version, raw = found[0] or b"0", found[1]
        parts = raw.split(b"|", 3) if raw is not None else []
        if len(parts) == 4:
            stored_version, stored_epoch, until_ms, body = parts
            if (
                stored_version == version
                and stored_epoch == epoch
                and until_ms.isdigit()
                and int(until_ms) > self.clock() * 1000
            ):
                return body
        return Miss(version)

    async def fill(
        self,
        member_id: str,
        view: bytes,
        miss: Miss,
        epoch: bytes | None,
        body: bytes,
        until: datetime,
    ) -> None:
        """Store a view read after `miss`, unless the member was bumped since."""
        if miss.version is None or epoch is None:
            return
        value = b"|".join([miss.version, epoch, str(int(until.timestamp() * 1000)).encode(), body])
        try:
            await self._fill(
                keys=[views_key(self._namespace, member_id)],
                args=[miss.version, view, value, KEY_TTL_SECONDS],
            )
        except (RedisError, OSError) as exc:
            self._failed("fill", exc)

    async def bump(self, *member_ids: str) -> None:
        """After a member-scoped write the gateway routed: the member's next read
        through the gateway asks the services (read-your-writes)."""
        members = {m for m in member_ids if m}
        if not members:
            return
        try:
            if len(members) == 1:
                await self._bump(
                    keys=[views_key(self._namespace, members.pop())], args=[KEY_TTL_SECONDS]
                )
                return
            async with self._redis.pipeline(transaction=False) as pipe:
                bump(pipe, self._namespace, members)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            # A view stored before the write may be served until its
            # valid-until: this process serves none for that long.
            self._skip_until = time.monotonic() + self.ttl_seconds
            log.warning("member views: bump of %s failed: %r", ", ".join(member_ids), exc)
