"""Member ids the member service has confirmed, so a POS CompleteOrder does
not ask it again (GetMember) for every order.

CompleteOrder refuses an id member does not know or has erased before
anything is written (gateway/pos.py). That check was one more gRPC hop and a
member transaction per order. Here the answer "this id is a member's (live,
or absorbed into one)" is kept in-process, tagged with the member service's
identity epoch: the Redis counter member bumps before and after every commit
of a merge, unmerge or erasure (services/member/cache.py), the same tag the
mini-program's member assertions use (gateway/auth/members.py). Each order
reads the epoch (one GET) and trusts an entry only if it was filled under
the current epoch, so an erasure is refused on the very next order, as
before. The epoch is read before member is asked, so an answer read while an
erasure was committing is filed under an epoch that is already stale.

Only positive answers are kept: an unknown id is asked about every time (it
may be enrolled a moment later). The identify that precedes a checkout fills
the entry, so the till's order for the member it just identified costs no
member call. Without Redis (or after a failed read, for
SKIP_AFTER_FAILURE_SECONDS) nothing is trusted: member is asked as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from cachetools import TTLCache

from servicekit.redis_client import RedisClient

from .auth.members import IdentityEpoch
from .ratelimit import SKIP_AFTER_FAILURE_SECONDS

log = logging.getLogger(__name__)

# Entries also expire: a bound on memory and on any staleness a lost epoch
# bump (Redis restarted empty, counter back at 0) could leave.
DEFAULT_TTL_SECONDS = 300.0
DEFAULT_SIZE = 200_000


class KnownMembers:
    def __init__(
        self,
        redis: RedisClient | None,
        namespace: str,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        size: int = DEFAULT_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._epoch = IdentityEpoch(redis, namespace, SKIP_AFTER_FAILURE_SECONDS)
        # member id -> the epoch member confirmed it under.
        self._confirmed: TTLCache[str, bytes] = TTLCache(size, ttl_seconds, timer=clock)

    async def epoch(self) -> bytes | None:
        """The identity epoch now; None when it cannot be read (nothing is trusted)."""
        return await self._epoch.read()

    def confirmed(self, epoch: bytes | None, member_id: str) -> bool:
        """Member confirmed this id under `epoch` (read just now)."""
        return epoch is not None and self._confirmed.get(member_id) == epoch

    def remember(self, epoch: bytes | None, member_id: str) -> None:
        """Member confirmed the id; `epoch` must have been read before it was asked."""
        if epoch is not None and member_id:
            self._confirmed[member_id] = epoch
