"""The gateway's per-member read views (servicekit/member_views.py): the POS
identify's balance and tier badge and the member centre's reply, answered
from Redis while the member's version, member's identity epoch and the view's
valid-until all stand, so a repeat read asks neither tiering nor rewards.

Read-your-writes: every member-scoped write the gateway routes (POS
CompleteOrder, offline orders, refunds; any POST/PUT/PATCH/DELETE under
`/v1/members/{id}/`, `/v1/admin/members/{id}/`, `/v1/workstation/members/{id}/`)
bumps the member's version before its reply leaves, so the member's next read
asks the services. Changes made elsewhere bump it through the producers'
outbox relays and tiering's (and, for merges, rewards') consumers: a view is at most their
lag behind.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from servicekit.member_views import CENTRE, IDENTIFY, MemberViews, Miss, valid_until
from servicekit.redis_client import RedisClient

from .auth.members import IdentityEpoch
from .metrics import GatewayMetrics
from .ratelimit import SKIP_AFTER_FAILURE_SECONDS

__all__ = ["CENTRE", "IDENTIFY", "GatewayViews", "MemberWriteBumps", "Miss"]

_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_MEMBER_PATH = re.compile(r"^/v1/(?:admin/|workstation/)?members/([^/]+)/")


class GatewayViews:
    """MemberViews and the identity epoch their entries are filed under."""

    def __init__(
        self,
        redis: RedisClient,
        namespace: str,
        ttl_seconds: float,
        timezone: str,
        views: MemberViews | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.views = views or MemberViews(redis, namespace, ttl_seconds, timezone)
        self._epoch = IdentityEpoch(redis, namespace, SKIP_AFTER_FAILURE_SECONDS)
        self._counted = (
            {
                (view, hit): metrics.member_view_reads.labels(view.decode(), outcome)
                for view in (IDENTIFY, CENTRE)
                for hit, outcome in ((True, "hit"), (False, "miss"))
            }
            if metrics is not None
            else {}
        )

    async def epoch(self) -> bytes | None:
        return await self._epoch.read()

    async def read(self, member_id: str, view: bytes, epoch: bytes | None) -> bytes | Miss:
        found = await self.views.read(member_id, view, epoch)
        counter = self._counted.get((view, not isinstance(found, Miss)))
        if counter is not None:
            counter.inc()
        return found

    async def fill(
        self,
        member_id: str,
        view: bytes,
        miss: Miss,
        epoch: bytes | None,
        body: bytes,
        read_at: datetime,
        boundaries: Iterable[datetime | None] = (),
    ) -> None:
        """Store a view the services answered after `miss`, read at `read_at`."""
        await self.views.fill(member_id, view, miss, epoch, body, self.until(read_at, boundaries))

    def now(self) -> datetime:
        return self.views.now()

    def until(self, read_at: datetime, boundaries: Iterable[datetime | None] = ()) -> datetime:
        v = self.views
        return valid_until(read_at, v.ttl_seconds, v.tz, boundaries)

    async def bump(self, *member_ids: str) -> None:
        await self.views.bump(*member_ids)


def encode_identify(points: int, tier_code: str, tier_name: str) -> bytes:
    return json.dumps([points, tier_code, tier_name], ensure_ascii=False).encode()


def decode_identify(body: bytes) -> tuple[int, str, str]:
    points, code, name = json.loads(body)
    return int(points), str(code), str(name)


def centre_boundaries(centre: Any) -> list[datetime | None]:
    """What the member centre names that changes it with time alone: an
    override's or grace's end, the next points expiry (the window's slide and
    the period's end fall at local midnights, counted in valid_until)."""
    found: list[datetime | None] = []
    if centre.tier is not None:
        found += [centre.tier.override_until, centre.tier.grace_until]
    if centre.points is not None:
        found += [batch.expires_at for batch in centre.points.expiring_soon]
    return found


class MemberWriteBumps:
    """ASGI middleware: a successful member-scoped write bumps the member's
    views before its response starts (the caller's next read sees it)."""

    def __init__(self, app: ASGIApp, views: GatewayViews) -> None:
        self.app = app
        self.views = views

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _WRITES:
            await self.app(scope, receive, send)
            return
        match = _MEMBER_PATH.match(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        member_id = match.group(1)

        async def bumping_send(message: Message) -> None:
            # A 5xx may follow a committed write (a timeout): bumped as well.
            if message["type"] == "http.response.start" and not 400 <= message["status"] < 500:
                await self.views.bump(member_id)
            await send(message)

        await self.app(scope, receive, bumping_send)
