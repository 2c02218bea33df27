"""Use cases of stores and orders, each given a unit of work: prepare and
complete a POS order (points spent and earned, coupons redeemed, in one
transaction), refund it, look up a store."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
from cachetools import LRUCache

from loyalty.common.v1 import common_pb2
from loyalty.events.v1 import events_pb2
from servicekit.db import PG_CONNECTION_ERRORS, Database, UnitOfWork
from servicekit.errors import Conflict, DomainError, NotFound
from servicekit.events import make_envelope
from servicekit.protos import timestamp

from .. import members
from ..coupons import handlers as coupon_service
from ..coupons import repository as coupon_repository
from ..coupons.domain import spread
from ..coupons.handlers import PRODUCER, CouponPolicy
from ..kernel import Channel, OrderRequest, parse_store_id
from ..points import repository as ledger
from ..points.earning import Period, period_start
from ..points.handlers import (
    Outcome,
    PointsLedger,
    Refund,
    error_doc,
    error_from_doc,
    member_erased,
)
from . import repository as repo
from .domain import (
    DEFAULT_LIMITS,
    OrderLimits,
    Settlement,
    check_store,
    parse_store_status,
    plan_settlement,
)
from .repository import StoreRecord

CHANNEL_TO_PROTO = {
    Channel.STORE: common_pb2.CHANNEL_STORE,
    Channel.MINI_PROGRAM: common_pb2.CHANNEL_MINI_PROGRAM,
    Channel.DELIVERY: common_pb2.CHANNEL_DELIVERY,
}


@dataclass(frozen=True)
class OrderResult:
    order_id: str
    points_earned: int
    points_balance: int
    replayed: bool
    points_redeemed: int = 0
    coupon_discount_fen: int = 0


# Member ids whose last order's member read complete_order_now keeps (~0.55 kB
# each, ~11 MB in all): an id that orders again before 20,000 other ids have.
ORDER_MEMBERS_CACHED = 20_000


def earn_idempotency_key(order_id: uuid.UUID | str) -> str:
    """One earn transaction per order, however often the order is retried."""
    return f"earn:order:{order_id}"


class RewardsHandlers:
    def __init__(
        self,
        limits: OrderLimits = DEFAULT_LIMITS,
        points: PointsLedger | None = None,
        coupon_policy: CouponPolicy | None = None,
    ) -> None:
        self._limits = limits
        self.points = points or PointsLedger()
        self.coupon_policy = coupon_policy or CouponPolicy()
        # complete_order_now: per member id sent, the member read its last
        # settled order was priced on (never trusted: SETTLE_ORDER_SQL checks it).
        self._order_members: LRUCache[uuid.UUID, members.OrderMember] = LRUCache(
            ORDER_MEMBERS_CACHED
        )

    def prepare_order(self, order: OrderRequest, now: datetime | None = None) -> Settlement:
        """Validate and price an order (at the base tier); no I/O, so bad input
        never opens a transaction."""
        # The base rule is the earning rules' own, so the settlement names the
        # rule the points were actually priced with.
        rules = self.points.rules
        planned = plan_settlement(order, self._limits, rules.base)
        at = planned.order.ordered_at or now or datetime.now(UTC)
        priced = rules.order_points(planned.order, at, None)
        return replace(planned, points=priced.points, rule_doc=priced.rule)

    async def complete_order(
        self, uow: UnitOfWork, settlement: Settlement, now: datetime | None = None
    ) -> Outcome[OrderResult]:
        """Settle an order once; a retry with the same body replays the first
        result (or the first refusal: not enough points is stored on the order)."""
        order = settlement.order
        assert order.channel is not None, "validated orders have a channel"
        conn = uow.conn
        order_id = uuid.uuid4()
        now = now or datetime.now(UTC)
        ordered_at = order.ordered_at or now
        # An absorbed (merged) id is credited to its survivor: the merges in
        # force, as MemberMerged recorded them (the request's hash keeps the
        # id the till sent, so its retries still match). One statement reads
        # the holder, its tier (and multiplier) and the erasure marks, and
        # claims the order for the holder unless either id is erased: an
        # erased member's order writes nothing.
        found = await repo.claim_member_order(
            conn,
            _new_order(order, order_id, ordered_at, settlement.request_hash, settlement.points),
        )
        sent, claimed = found.member, found.claimed
        member_id, state = sent.holder, sent.state
        if state.erased or sent.sent_erased:
            raise member_erased(uuid.UUID(order.member_id))
        # From here on (coupons, events) the order is the survivor's.
        order = replace(order, member_id=str(member_id))
        assert order.channel is not None
        if not claimed:
            return await self._replay(uow, settlement)
        if order.points_to_redeem:
            # Spent before this order's own points land: they are not spendable yet.
            spent = await self.points.redeem_for_order(
                conn, member_id, order.points_to_redeem, order_id, now
            )
            if isinstance(spent, DomainError):
                await repo.reject_order(conn, order_id, error_doc(spent))
                return Outcome(error=spent)
        coupon_discount, earning_order = 0, order
        if order.coupon_codes:
            # After the points: a refusal raises and takes the whole order back.
            coupon_discount = await coupon_service.redeem_for_order(
                conn, order_id=order_id, order=order, policy=self.coupon_policy, now=now
            )
            # Points accrue on what was paid on each line, after coupons and points.
            paid_lines = spread(
                [line.paid_amount_fen for line in order.lines],
                order.gross_amount_fen - order.paid_amount_fen,
            )
            earning_order = replace(
                order,
                lines=tuple(
                    replace(line, paid_amount_fen=fen)
                    for line, fen in zip(order.lines, paid_lines, strict=True)
                ),
            )
        rules = self.points.rules
        points, rule = settlement.points, settlement.rule_doc or settlement.rule.describe()
        if rules.needs_tier or state.tier_code is not None or order.coupon_codes:
            priced = rules.order_points(
                earning_order, ordered_at, state.tier_code, state.multiplier_bp
            )
            points, rule = priced.points, priced.rule
        if rules.daily_cap is not None and points:
            granted, _ = await ledger.count_against_cap(
                conn,
                member_id,
                "orders",
                period_start(Period.DAY, ordered_at),
                points,
                rules.daily_cap,
            )
            if granted < points:
                rule = rule | {"daily_cap": rules.daily_cap, "capped_from": points}
                points = granted
        # Built before the write: OrderCompleted goes in with the earning, in
        # the same statement (one round trip fewer than uow.emit); the
        # servicer wakes the relay after the commit.
        balance = await repo.record_earning(
            conn, self._earning(order_id, member_id, order, ordered_at, points, rule)
        )
        return Outcome(
            OrderResult(
                str(order_id),
                points,
                balance.available,
                replayed=False,
                points_redeemed=order.points_to_redeem,
                coupon_discount_fen=coupon_discount,
            )
        )

    def _earning(
        self,
        order_id: uuid.UUID,
        member_id: uuid.UUID,
        order: OrderRequest,
        ordered_at: datetime,
        points: int,
        rule: dict[str, object],
    ) -> repo.Earning:
        """The ledger side of a settled order, with its OrderCompleted (the
        holder's: `order` carries the holder's id) for the same statement."""
        assert order.channel is not None
        policy = self.points.policy
        completed = make_envelope(
            PRODUCER,
            events_pb2.OrderCompleted(
                order_id=str(order_id),
                member_id=order.member_id,
                store_id=order.store_id,
                pos_transaction_id=order.pos_transaction_id,
                channel=CHANNEL_TO_PROTO[order.channel],
                paid_amount_fen=order.paid_amount_fen,
                gross_amount_fen=order.gross_amount_fen,
                points_earned=points,
                ordered_at=timestamp(ordered_at),
                lines=[
                    events_pb2.OrderCompletedLine(
                        sku=line.sku,
                        category=line.category,
                        quantity=line.quantity,
                        paid_amount_fen=line.paid_amount_fen,
                    )
                    for line in order.lines
                ],
                staff_code=order.staff_code,
                guide_ref=order.guide_ref,
            ),
            order.member_id,
        )
        return repo.Earning(
            transaction_id=uuid.uuid4(),
            member_id=member_id,
            order_id=order_id,
            idempotency_key=earn_idempotency_key(order_id),
            points=points,
            rule=rule,
            lot_id=uuid.uuid4(),
            earned_at=ordered_at,
            expires_at=policy.expiry.expires_at(ordered_at),
            activates_at=policy.activates_at(ordered_at),
            event=(completed.event_id, completed.event_type, completed.SerializeToString()),
        )

    async def complete_order_now(
        self, db: Database, settlement: Settlement, now: datetime | None = None
    ) -> Outcome[OrderResult] | None:
        """complete_order as a transaction of its own (the CompleteOrder RPC)
        without BEGIN and COMMIT: the member read (members.order_member, a
        statement of its own, as it was the first of the transaction under
        READ COMMITTED; skipped when this id's last order was settled here:
        that read is reused), then the claim, the earning, its OrderCompleted
        and the order with its balance-after in ONE statement
        (repository.SETTLE_ORDER_SQL), which writes only when the key is free,
        the store active, neither id erased and the holder and its tier those
        the order was priced on. None when complete_order must
        decide (nothing was written here then): an order that spends points or
        coupons or meets a daily cap (its steps need reads between the claim
        and the earning), a replay, a closed or unknown store, an erasure
        committed meanwhile, a lost connection (committed or not: its key
        replays it)."""
        order = settlement.order
        rules = self.points.rules
        if order.points_to_redeem or order.coupon_codes or rules.daily_cap is not None:
            return None
        channel = order.channel
        assert channel is not None, "validated orders have a channel"
        sent_id = uuid.UUID(order.member_id)
        now = now or datetime.now(UTC)
        ordered_at = order.ordered_at or now
        order_id = uuid.uuid4()
        # The member as last read for an order of this id: the statement
        # settles only while it still stands, so the read is skipped.
        sent = self._order_members.get(sent_id)
        try:
            async with db.pool.acquire() as conn:
                if sent is None:
                    sent = await members.order_member(conn, sent_id)
                    if sent.state.erased or sent.sent_erased:
                        raise member_erased(sent_id)
                member_id, state = sent.holder, sent.state
                order = replace(order, member_id=str(member_id))
                points, rule = settlement.points, settlement.rule_doc or settlement.rule.describe()
                if rules.needs_tier or state.tier_code is not None:
                    priced = rules.order_points(
                        order, ordered_at, state.tier_code, state.multiplier_bp
                    )
                    points, rule = priced.points, priced.rule
                balance = await repo.settle_order(
                    conn,
                    _new_order(order, order_id, ordered_at, settlement.request_hash, points),
                    self._earning(order_id, member_id, order, ordered_at, points, rule),
                    sent_id,
                    state,
                )
        except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
            return None
        except PG_CONNECTION_ERRORS:
            # Committed or not, unknown: complete_order replays it by its key if it was.
            return None
        if balance is None:
            # Also when the member changed (tier, merge, erasure): read afresh next time.
            self._order_members.pop(sent_id, None)
            return None
        self._order_members[sent_id] = sent
        return Outcome(OrderResult(str(order_id), points, balance.available, replayed=False))

    async def _replay(self, uow: UnitOfWork, settlement: Settlement) -> Outcome[OrderResult]:
        order = settlement.order
        found = await repo.find_order(uow.conn, order.store_id, order.pos_transaction_id)
        if found.order is None:
            if found.store_status != "active":
                state = "is closed" if found.store_status else "does not exist"
                raise NotFound(
                    f"store {order.store_id} {state}", code="UNKNOWN_STORE", field="store_id"
                )
            # Neither settled nor refused: the store turned active after our
            # insert looked at it (it only settles for active stores). A retry
            # sees the store as it is now.
            raise Conflict(
                "the order was being settled concurrently; retry",
                code="CONCURRENT_SETTLEMENT",
                field="pos_transaction_id",
            )
        if found.order.request_hash != settlement.request_hash:
            raise Conflict(
                f"pos_transaction_id {order.pos_transaction_id} was already used at store"
                f" {order.store_id} for a different order",
                code="IDEMPOTENCY_KEY_REUSED",
                field="pos_transaction_id",
            )
        if found.order.rejection is not None:
            return Outcome(error=error_from_doc(found.order.rejection))
        return Outcome(
            OrderResult(
                found.order.order_id,
                found.order.points_earned,
                found.order.points_balance_after,
                replayed=True,
                points_redeemed=found.order.points_redeemed,
                coupon_discount_fen=found.order.coupon_discount_fen,
            )
        )

    async def refund_order(
        self,
        uow: UnitOfWork,
        store_id: str,
        pos_transaction_id: str,
        refund_transaction_id: str,
        refunded_amount_fen: int,
        now: datetime,
    ) -> tuple[Outcome[Refund], list[coupon_service.Restoration]]:
        """Reverse the order's points, then give its coupons back when the
        order is refunded in full (in the same transaction; idempotent)."""
        outcome = await self.points.refund_order(
            uow, store_id, pos_transaction_id, refund_transaction_id, refunded_amount_fen, now
        )
        if outcome.value is None:
            return outcome, []
        order_id = uuid.UUID(outcome.value.order_id)
        refunded, _, _, _ = await ledger.refunds_so_far(uow.conn, order_id)
        paid = await coupon_repository.order_paid_amount(uow.conn, order_id)
        return outcome, await coupon_service.restore_for_refund(
            uow.conn, order_id, paid, refunded, now
        )

    async def put_store(self, uow: UnitOfWork, store: StoreRecord) -> StoreRecord:
        """Create or update a store (operators); validated before anything is written."""
        check_store(
            store.store_id,
            store.name,
            store.city,
            store.address,
            store.time_zone,
            float(store.latitude),
            float(store.longitude),
        )
        parse_store_status(store.status)
        # Six decimals, as stored (about 0.1 m).
        exact = replace(
            store,
            latitude=Decimal(str(store.latitude)).quantize(Decimal("0.000001")),
            longitude=Decimal(str(store.longitude)).quantize(Decimal("0.000001")),
        )
        await repo.upsert_stores(uow.conn, [exact])
        return await self.get_store(uow, store.store_id)

    async def set_store_status(self, uow: UnitOfWork, store_id: str, status: str) -> StoreRecord:
        """Close a store (it settles no new orders; refunds of its orders go on)
        or open it again."""
        parse_store_id(store_id)
        if not await repo.set_store_status(uow.conn, store_id, parse_store_status(status)):
            raise NotFound(
                f"store {store_id} does not exist", code="UNKNOWN_STORE", field="store_id"
            )
        return await self.get_store(uow, store_id)

    async def list_stores(self, uow: UnitOfWork) -> list[StoreRecord]:
        return await repo.list_stores(uow.conn)

    async def get_store(self, uow: UnitOfWork, store_id: str) -> StoreRecord:
        parse_store_id(store_id)
        store = await repo.get_store(uow.conn, store_id)
        if store is None:
            raise NotFound(
                f"store {store_id} does not exist", code="UNKNOWN_STORE", field="store_id"
            )
        return store


def _new_order(
    order: OrderRequest,
    order_id: uuid.UUID,
    ordered_at: datetime,
    request_hash: bytes,
    points: int,
) -> repo.NewOrder:
    """The order row checkout writes, for `order.member_id` (the id sent, or
    the holder once a member read named it)."""
    assert order.channel is not None, "validated orders have a channel"
    return repo.NewOrder(
        order_id=order_id,
        store_id=order.store_id,
        pos_transaction_id=order.pos_transaction_id,
        member_id=uuid.UUID(order.member_id),
        channel=order.channel.value,
        paid_amount_fen=order.paid_amount_fen,
        gross_amount_fen=order.gross_amount_fen or None,
        lines=order.lines,
        ordered_at=ordered_at,
        request_hash=request_hash,
        points_earned=points,
        points_redeemed=order.points_to_redeem,
    )
