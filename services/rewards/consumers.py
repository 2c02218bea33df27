"""Events rewards consumes: OneID merges move points lots and coupons between
members and are recorded for referral and mall reads;
tier changes feed the local tier projection the earning rules read; erasures
mark members whose later writes are refused.

Each handler runs in the transaction that records the event id (dedup), and
the ledger move itself is keyed by merge id, so a replayed or duplicated
event (even under another event id) moves nothing twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from loyalty.events.v1 import events_pb2
from servicekit.db import UnitOfWork
from servicekit.events import ReceivedEvent

from . import members, merges
from .coupons import handlers as coupon_service
from .points.handlers import PointsLedger
from .referral import repository as referral_repo
from .referral.handlers import Referrals


def event_time(event: ReceivedEvent, field: str) -> datetime:
    """The payload's own time field, or the envelope's when the producer left it out."""
    payload = event.payload
    ts = getattr(payload, field) if payload.HasField(field) else event.envelope.occurred_at
    return ts.ToDatetime(tzinfo=UTC)


class MemberEvents:
    def __init__(
        self, points: PointsLedger, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self._points = points
        # Lazy expiry during a move runs at this clock's time (tests inject one).
        self._clock = clock

    async def on_merged(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
        merged = event.payload
        assert isinstance(merged, events_pb2.MemberMerged)
        await self._points.merge(
            uow,
            merged.merge_id,
            merged.survivor_member_id,
            merged.absorbed_member_id,
            self._clock(),
        )
        # Coupons follow the points (an UPDATE by member: replays move nothing).
        await coupon_service.merge(
            uow.conn, merged.merge_id, merged.survivor_member_id, merged.absorbed_member_id
        )
        # Invite codes, referrals and mall limits are read through the merge.
        await merges.record_merge(
            uow.conn,
            merged.merge_id,
            uuid.UUID(merged.absorbed_member_id),
            uuid.UUID(merged.survivor_member_id),
            event_time(event, "merged_at"),
        )

    async def on_unmerged(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
        unmerged = event.payload
        assert isinstance(unmerged, events_pb2.MemberUnmerged)
        await self._points.unmerge(
            uow,
            unmerged.merge_id,
            unmerged.survivor_member_id,
            unmerged.restored_member_id,
            self._clock(),
        )
        await coupon_service.unmerge(
            uow.conn, unmerged.survivor_member_id, unmerged.restored_member_id
        )
        await merges.record_unmerge(uow.conn, unmerged.merge_id, event_time(event, "unmerged_at"))


async def on_tier_changed(uow: UnitOfWork, event: ReceivedEvent) -> None:
    changed = event.payload
    assert isinstance(changed, events_pb2.TierChanged)
    at = event_time(event, "changed_at")
    await members.record_tier(
        uow.conn,
        uuid.UUID(changed.member_id),
        changed.to_tier,
        at,
        # 0: the event carried no multiplier (older producers); a negative one
        # is a producer bug and must not poison the stream: config applies.
        changed.points_multiplier_bp if changed.points_multiplier_bp > 0 else None,
    )


async def on_member_erased(uow: UnitOfWork, event: ReceivedEvent) -> None:
    """Record the erasure (idempotent: a redelivery keeps the first time).
    Rewards holds no personal data beyond member ids: journal, orders and lots
    are financial records and stay; later writes for the member are refused."""
    erased = event.payload
    assert isinstance(erased, events_pb2.MemberErased)
    at = event_time(event, "erased_at")
    erased_ids = [uuid.UUID(m) for m in erased.member_ids]
    await members.record_erasure(uow.conn, erased_ids, at)
    # Device and identifier fingerprints are about the person, not money: gone.
    await referral_repo.forget_fingerprints(uow.conn, erased_ids)


async def on_zone_set(uow: UnitOfWork, event: ReceivedEvent) -> None:
    """Member's MemberZoneSet: the member's registration store, the store the
    dashboards count rewards' per-member figures under (MEMBER_STORE)."""
    zone = event.payload
    assert isinstance(zone, events_pb2.MemberZoneSet)
    await members.record_registration_store(
        uow.conn, uuid.UUID(zone.member_id), zone.registration_store_id
    )


class OrderEvents:
    """Rewards' own OrderCompleted, read back from its stream: an invitee's
    first completed order grants the referral's first-order step (once: the
    referral row is marked by a conditional UPDATE, each reward by its key)."""

    def __init__(self, referrals: Referrals) -> None:
        self._referrals = referrals

    async def on_order_completed(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
        completed = event.payload
        assert isinstance(completed, events_pb2.OrderCompleted)
        if completed.store_id and completed.member_id:
            # The member's latest order store (the dashboards' MEMBER_STORE).
            await members.record_order_store(
                uow.conn,
                uuid.UUID(completed.member_id),
                completed.store_id,
                event_time(event, "ordered_at"),
            )
        await self._referrals.on_order_completed(
            uow,
            completed.member_id,
            completed.order_id,
            event_time(event, "ordered_at"),
            datetime.now(UTC),
        )

    async def on_orders_completed(self, uow: UnitOfWork, events: list[ReceivedEvent]) -> None:
        """`on_order_completed` for a read's run of orders of distinct members
        (the consumer's batch handler): the members' order stores in one
        statement, then the referral step only for the members with an
        invitation still waiting for its first order (most have none), found
        in one statement."""
        orders = []
        for event in events:
            completed = event.payload
            assert isinstance(completed, events_pb2.OrderCompleted)
            orders.append(
                (completed, uuid.UUID(completed.member_id), event_time(event, "ordered_at"))
            )
        await members.record_order_stores(
            uow.conn, [(m, c.store_id, at) for c, m, at in orders if c.store_id]
        )
        waiting = await referral_repo.awaiting_first_order(uow.conn, [m for _, m, _ in orders])
        for completed, member_id, ordered_at in orders:
            if member_id in waiting:
                await self._referrals.on_order_completed(
                    uow, completed.member_id, completed.order_id, ordered_at, datetime.now(UTC)
                )
