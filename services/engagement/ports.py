"""Ports: what engagement needs from other services, and today's adapters.

- Consent by channel and purpose lives in the member service (issue 3). Until it
  exposes consent (an RPC, or better a ConsentChanged event this service keeps
  a projection of), `LocalConsent` reads the engagement schema's own consent
  projection, which the engagement RPCs (unsubscribe, RecordConsent, a
  mini-program subscription tap) write. The scheduler asks the port for a whole
  batch at once, inside the batch transaction, so the answer is the one in
  force at send time.
- Coupons and points are issued by the rewards service (issue 4). Steps write a
  durable `reward_requests` row (key = enrollment:seq, once); a `RewardsPort`
  adapter delivers them. No adapter is wired until rewards has the RPCs, so the
  requests stay `pending` and the metrics say so; nothing pretends to succeed.
"""

from __future__ import annotations

import uuid
from typing import Protocol

from servicekit.db import Connection

from . import repository as repo
from .domain import MemberFacts


class ConsentPort(Protocol):
    async def facts_with_consent(
        self, conn: Connection, member_ids: list[uuid.UUID]
    ) -> dict[str, MemberFacts]:
        """Member facts with `consents` (channel -> marketing consent) and the
        non-personalised choice, for every known member among `member_ids`."""
        ...


class LocalConsent:
    """The engagement schema's consent projection, read in the caller's transaction."""

    async def facts_with_consent(
        self, conn: Connection, member_ids: list[uuid.UUID]
    ) -> dict[str, MemberFacts]:
        return await repo.load_facts(conn, member_ids)


class RewardsPort(Protocol):
    async def issue_coupon(self, request_key: str, member_id: str, coupon: str) -> None: ...

    async def award_points(self, request_key: str, member_id: str, points: int) -> None: ...
