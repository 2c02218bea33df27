"""Tier benefits issued through rewards: the upgrade gift and the birthday coupon.

A grant is a durable `tiering.benefit_grants` row, written once per member per
upgrade (key `upgrade_gift:<member>:<programme>:<tier>:<period start>`) in the
transaction that decided the upgrade, or once per member per year for the
birthday coupon (`birthday:<member>:<year>`, found by the sweep in the member's
birthday month). The dispatcher hands each pending grant to rewards'
IssueCoupon with the grant key as the issue key, so a retry after a lost answer
replays the coupon instead of issuing a second one. A refusal rewards decided
(stock out, per-member limit, template paused or ended, member erased) fails the
grant with rewards' code; a transport failure is retried with backoff.

The client follows engagement's RewardsGrpc (services/engagement/ports.py):
one channel from servicekit.clients, the same retry classification.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import grpc

from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc
from servicekit.clients import create_channel
from servicekit.db import Connection, Database
from servicekit.errors import error_info

from . import repository as repo
from .domain import TierProgramme
from .evaluation import Change

log = logging.getLogger(__name__)

# gRPC codes worth retrying; anything else is the grant's own fault.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
UPGRADES = ("upgrade", "relative_upgrade")
MAX_ATTEMPTS = 10


@dataclass(frozen=True)
class Outcome:
    status: str  # issued | retry | failed
    coupon_id: str = ""
    reason: str = ""


class CouponPort(Protocol):
    async def issue(self, grant_key: str, member_id: str, template_id: str) -> Outcome: ...


class RewardsCoupons:
    def __init__(self, target: str, timeout: float) -> None:
        self._channel = create_channel(target)
        self._stub = rewards_pb2_grpc.RewardsServiceStub(self._channel)
        self._timeout = timeout

    async def issue(self, grant_key: str, member_id: str, template_id: str) -> Outcome:
        try:
            coupon = await self._stub.IssueCoupon(
                rewards_pb2.IssueCouponRequest(
                    template_id=template_id,
                    member_id=member_id,
                    reason="tier_benefit",
                    issue_key=grant_key,
                    issued_by="tiering",
                ),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            code, _ = error_info(exc)
            status = exc.code()
            # RESOURCE_EXHAUSTED with a domain code (stock out) is rewards' decision.
            retry = status in RETRYABLE or (
                status is grpc.StatusCode.RESOURCE_EXHAUSTED and not code
            )
            return Outcome("retry" if retry else "failed", reason=code or status.name)
        return Outcome("issued", coupon_id=coupon.coupon_id)

    async def close(self) -> None:
        await self._channel.close()


def upgrade_gift_rows(
    member_id: uuid.UUID,
    programme: TierProgramme,
    changes: Iterable[Change],
    period_start: datetime,
    by_version: dict[int, TierProgramme] | None = None,
) -> list[tuple[str, uuid.UUID, str, str, str]]:
    """(grant_key, member, kind, template, tier) for each upgrade to a tier with
    an upgrade gift; once per member, tier and period (an upgrade undone by a
    refund and reached again in the same period gives no second gift)."""
    rows = []
    for change in changes:
        if not change.moved:
            continue
        decided = (by_version or {}).get(change.version, programme)
        codes = [t.code for t in decided.ladder.tiers]
        # An offline order replayed late that lifts the member is an upgrade too.
        lifted = change.reason == "late_order" and (
            change.from_tier in codes
            and change.to_tier in codes
            and codes.index(change.to_tier) > codes.index(change.from_tier)
        )
        if change.reason not in UPGRADES and not lifted:
            continue
        tier = next((t for t in decided.ladder.tiers if t.code == change.to_tier), None)
        template = tier.benefits.upgrade_gift_coupon_template if tier else None
        if not template:
            continue
        # The period's local start day (the state may come back from the
        # database in UTC: the key must not depend on that).
        day = period_start.astimezone(programme.rules.tz).date().isoformat()
        key = f"upgrade_gift:{member_id}:{programme.programme_id}:{change.to_tier}:{day}"
        rows.append((key, member_id, "upgrade_gift", template, change.to_tier))
    return rows


async def insert_grants(conn: Connection, rows: list[tuple[str, uuid.UUID, str, str, str]]) -> int:
    """Pending grants in one statement (the batch writes a chunk's at once);
    a key granted before is left as it is."""
    if not rows:
        return 0
    status = await conn.execute(
        "INSERT INTO tiering.benefit_grants (grant_key, member_id, kind, template_id, tier_code)"
        " SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[])"
        " ON CONFLICT (grant_key) DO NOTHING",
        *(list(column) for column in zip(*rows, strict=True)),
    )
    return int(status.rsplit(" ", 1)[1])


async def grant_upgrade_gifts(
    conn: Connection,
    member_id: uuid.UUID,
    programme: TierProgramme,
    changes: Iterable[Change],
    period_start: datetime,
    by_version: dict[int, TierProgramme] | None = None,
) -> int:
    """upgrade_gift_rows, written in the caller's transaction."""
    return await insert_grants(
        conn, upgrade_gift_rows(member_id, programme, changes, period_start, by_version)
    )


async def grant_birthdays(conn: Connection, programme: TierProgramme, now: datetime) -> int:
    """Birthday grants for members whose birthday month is this local month and
    whose tier has a birthday coupon: once per member per year."""
    local = now.astimezone(programme.rules.tz)
    written = 0
    for tier in programme.ladder.tiers:
        template = tier.benefits.birthday_coupon_template
        if not template:
            continue
        status = await conn.execute(
            "INSERT INTO tiering.benefit_grants (grant_key, member_id, kind, template_id,"
            " tier_code) SELECT 'birthday:' || p.member_id || ':' || $4::text, p.member_id,"
            " 'birthday', $3, t.tier_code FROM tiering.member_profiles p"
            " JOIN tiering.member_tiers t ON t.member_id = p.member_id"
            " WHERE p.birth_month = $1 AND t.tier_code = $2 AND t.programme_id = $5"
            " ON CONFLICT (grant_key) DO NOTHING",
            local.month,
            tier.code,
            template,
            str(local.year),
            programme.programme_id,
        )
        written += int(status.rsplit(" ", 1)[1])
    return written


class BenefitDispatcher:
    """Sends pending grants to rewards; several replicas may run (SKIP LOCKED)."""

    def __init__(self, db: Database, port: CouponPort, batch: int = 100) -> None:
        self._db = db
        self._port = port
        self._batch = batch

    async def run_once(self, now: datetime) -> int:
        """One batch of due grants; returns how many were settled (issued or failed)."""
        settled = 0
        async with self._db.unit_of_work() as uow:
            rows = await uow.conn.fetch(
                "SELECT grant_key, member_id, template_id, attempts FROM tiering.benefit_grants"
                # A fresh grant is due at once; a retried one at its back-off.
                " WHERE status = 'pending' AND (attempts = 0 OR next_attempt_at <= $1)"
                " ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED",
                now,
                self._batch,
            )
            for row in rows:
                outcome = await self._port.issue(
                    row["grant_key"], str(row["member_id"]), row["template_id"]
                )
                attempts = row["attempts"] + 1
                if outcome.status == "retry" and attempts < MAX_ATTEMPTS:
                    await uow.conn.execute(
                        "UPDATE tiering.benefit_grants SET attempts = $2, failure = $3,"
                        " next_attempt_at = $4, updated_at = now() WHERE grant_key = $1",
                        row["grant_key"],
                        attempts,
                        outcome.reason,
                        now + timedelta(seconds=min(2**attempts, 3600)),
                    )
                    continue
                await uow.conn.execute(
                    "UPDATE tiering.benefit_grants SET status = $2, attempts = $3,"
                    " coupon_id = $4, failure = $5, updated_at = now() WHERE grant_key = $1",
                    row["grant_key"],
                    "issued" if outcome.status == "issued" else "failed",
                    attempts,
                    outcome.coupon_id or None,
                    outcome.reason or None,
                )
                settled += 1
        return settled


async def run_forever(
    db: Database,
    dispatcher: BenefitDispatcher,
    programme_id: str,
    clock: Callable[[], datetime],
    poll: float,
) -> None:
    """The service's loop: birthday grants for this month, then due grants."""
    while True:
        try:
            now = clock()
            async with db.unit_of_work() as uow:
                programme = await repo.programme_at(uow.conn, programme_id, now)
                if programme is not None:
                    await grant_birthdays(uow.conn, programme, now)
            while await dispatcher.run_once(now):
                pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("benefit dispatch failed; retrying")
        await asyncio.sleep(poll)
