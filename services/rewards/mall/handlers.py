"""Use cases of the points mall, each given a unit of work.

An exchange, in the caller's one transaction: the (member, exchange key)
lock and replay check, one unit of stock (conditional UPDATE), the member's
count (conditional UPSERT), the points through the ledger's own `redeem`
(double-entry, lots, idempotency), then the item: a coupon through
`issue_coupon` or a goods fulfilment record. Any refusal raises, and the unit
of work rolls everything back: stock, count and points are untouched.

An item with a cash part takes two steps: the exchange *reserves* (points
held, stock and count taken, `awaiting_payment` until `payment_due_at`); the
backend *confirms* it with the payment reference its payment notification
carried (the hold is posted, the coupon issued or the goods queued, once per
reference); past the deadline the release job gives the points, stock and
count back. An operator may reverse a completed exchange once: points (a
credit naming the operator), stock and count back, an unused coupon revoked.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import asyncpg

from servicekit.db import Connection, UnitOfWork
from servicekit.errors import Conflict, FailedPrecondition, InvalidArgument, NotFound

from .. import merges
from ..coupons import repository as coupon_repository
from ..kernel import parse_member_id
from ..points import repository as ledger
from ..points.domain import check_key, check_text, request_hash
from ..points.handlers import PointsLedger, refuse_erased
from . import repository as repo
from .domain import (
    ItemKind,
    ItemSpec,
    ItemState,
    ItemStatus,
    check_item,
    check_transition,
    exchange_refusal,
    limit_reached,
    parse_exchange_id,
)

COUPON_REASON_MALL = "mall_exchange"


class CouponIssuer(Protocol):
    """coupons.handlers.issue_coupon: issues inside the caller's transaction and
    raises a DomainError (stock, per-member limit, template status)."""

    async def __call__(
        self,
        conn: Connection,
        *,
        template_id: str,
        member_id: uuid.UUID,
        reason: str,
        issue_key: str,
        now: datetime,
    ) -> Any: ...


def issued_coupon_id(issued: Any) -> str:
    """The coupon's id from coupons.handlers.IssuedCoupon."""
    return str(issued.coupon_id)


@dataclass(frozen=True)
class Exchange:
    exchange_id: str
    member_id: str
    item_id: str
    exchange_key: str
    points: int
    cash_fen: int
    points_transaction_id: str
    coupon_id: str
    sku: str
    fulfilment: str
    created_at: datetime
    replayed: bool = False
    carrier: str = ""
    tracking_number: str = ""
    shipped_at: datetime | None = None
    hold_id: str = ""
    payment_due_at: datetime | None = None
    payment_reference: str = ""
    paid_at: datetime | None = None
    released_at: datetime | None = None
    reversed_at: datetime | None = None
    reversed_by: str = ""


def on_sale(item: repo.ItemRow, now: datetime) -> bool:
    spec = item.spec
    return (
        item.status is ItemStatus.ACTIVE
        and item.stock_remaining > 0
        and (spec.starts_at is None or spec.starts_at <= now)
        and (spec.ends_at is None or now < spec.ends_at)
    )


def item_state(item: repo.ItemRow | None) -> ItemState | None:
    if item is None:
        return None
    return ItemState(item.status, item.stock_remaining, item.spec.starts_at, item.spec.ends_at)


def exchange_of(row: Any, replayed: bool = False) -> Exchange:
    return Exchange(
        exchange_id=str(row["id"]),
        member_id=str(row["member_id"]),
        item_id=str(row["item_id"]),
        exchange_key=row["exchange_key"],
        points=row["points"],
        cash_fen=row["cash_fen"],
        points_transaction_id=str(row["points_transaction_id"]),
        coupon_id=row["coupon_id"] or "",
        sku=row["sku"] or "",
        fulfilment=row["fulfilment"],
        created_at=row["created_at"],
        replayed=replayed,
        carrier=row["carrier"] or "",
        tracking_number=row["tracking_number"] or "",
        shipped_at=row["shipped_at"],
        hold_id=str(row["hold_id"]) if row["hold_id"] else "",
        payment_due_at=row["payment_due_at"],
        payment_reference=row["payment_reference"] or "",
        paid_at=row["paid_at"],
        released_at=row["released_at"],
        reversed_at=row["reversed_at"],
        reversed_by=row["reversed_by"] or "",
    )


FULFILMENTS = ("issued", "pending", "shipped", "awaiting_payment", "released", "reversed")
# How long a points-plus-cash exchange waits for its payment (REWARDS_MALL_PAYMENT_TTL_SECONDS).
DEFAULT_PAYMENT_TTL = timedelta(minutes=15)


def check_fulfilment(value: str) -> str | None:
    """A list filter: one of FULFILMENTS, or empty for all."""
    if value and value not in FULFILMENTS:
        raise InvalidArgument(
            f"fulfilment must be one of {', '.join(FULFILMENTS)} (or empty), not {value!r}",
            code="INVALID_FULFILMENT",
            field="fulfilment",
        )
    return value or None


def unknown_item(item_id: uuid.UUID | str) -> NotFound:
    return NotFound(
        f"mall item {item_id} does not exist", code="UNKNOWN_MALL_ITEM", field="item_id"
    )


def unknown_exchange(exchange_id: str) -> NotFound:
    return NotFound(
        f"mall exchange {exchange_id} does not exist",
        code="UNKNOWN_MALL_EXCHANGE",
        field="exchange_id",
    )


class PointsMall:
    def __init__(
        self,
        points: PointsLedger,
        issue_coupon: CouponIssuer,
        payment_ttl: timedelta = DEFAULT_PAYMENT_TTL,
    ) -> None:
        self._points = points
        self._issue_coupon = issue_coupon
        self.payment_ttl = payment_ttl

    # ---- operators -----------------------------------------------------------

    async def create_item(
        self, uow: UnitOfWork, spec: ItemSpec, status: ItemStatus = ItemStatus.DRAFT
    ) -> repo.ItemRow:
        check_item(spec)
        await self._check_template(uow, spec)
        if status is ItemStatus.ENDED:
            check_transition(ItemStatus.DRAFT, status)
        return await repo.insert_item(uow.conn, uuid.uuid4(), spec, status)

    async def update_item(
        self, uow: UnitOfWork, item_id: uuid.UUID, spec: ItemSpec
    ) -> repo.ItemRow:
        check_item(spec)
        await self._check_template(uow, spec)
        conn = uow.conn
        current = await repo.item(conn, item_id, lock=True)
        if current is None:
            raise unknown_item(item_id)
        if current.status is ItemStatus.ENDED:
            raise FailedPrecondition(
                f"mall item {item_id} has ended and cannot change",
                code="MALL_ITEM_ENDED",
                field="item_id",
            )
        if spec.kind is not current.spec.kind:
            raise FailedPrecondition(
                "an item's kind cannot change; end it and create another",
                code="ITEM_KIND_IMMUTABLE",
                field="kind",
            )
        updated = await repo.update_item(conn, item_id, spec)
        if updated is None:
            sold = current.spec.stock_total - current.stock_remaining
            raise FailedPrecondition(
                f"{sold} already exchanged; stock_total cannot go below that",
                code="STOCK_BELOW_EXCHANGED",
                field="stock_total",
            )
        return updated

    async def _check_template(self, uow: UnitOfWork, spec: ItemSpec) -> None:
        """A coupon item names a template that exists (its status is judged at
        each exchange: a paused template refuses exchanges, not the item)."""
        if spec.kind is ItemKind.COUPON:
            if await coupon_repository.get_template(uow.conn, spec.coupon_template_id) is None:
                raise NotFound(
                    f"coupon template {spec.coupon_template_id} does not exist",
                    code="UNKNOWN_TEMPLATE",
                    field="coupon_template_id",
                )

    async def set_status(
        self, uow: UnitOfWork, item_id: uuid.UUID, status: ItemStatus
    ) -> repo.ItemRow:
        conn = uow.conn
        current = await repo.item(conn, item_id, lock=True)
        if current is None:
            raise unknown_item(item_id)
        check_transition(current.status, status)
        if status is current.status:
            return current
        return await repo.set_item_status(conn, item_id, status)

    async def get_item(self, uow: UnitOfWork, item_id: uuid.UUID) -> repo.ItemRow:
        found = await repo.item(uow.conn, item_id)
        if found is None:
            raise unknown_item(item_id)
        return found

    async def list_items(
        self, uow: UnitOfWork, before: int | None, limit: int, on_sale_at: datetime | None
    ) -> list[repo.ItemRow]:
        return await repo.list_items(uow.conn, before, limit, on_sale_at)

    # ---- members -------------------------------------------------------------

    async def exchanges_of(
        self,
        uow: UnitOfWork,
        member_id: str,
        before: int | None,
        size: int,
        fulfilment: str = "",
    ) -> tuple[list[Exchange], int | None]:
        """The member's exchanges (every member's when `member_id` is empty:
        the operators' fulfilment queue), newest first; the next page's cursor
        (None: last)."""
        state = check_fulfilment(fulfilment)
        person = None
        if member_id:
            # The person's: exchanges made under ids merged into this member too.
            member = uuid.UUID(parse_member_id(member_id))
            person = await merges.person_of(uow.conn, member)
        rows = await repo.exchanges_of(uow.conn, person, before, size + 1, state)
        more = len(rows) > size
        rows = rows[:size]
        return [exchange_of(r) for r in rows], (rows[-1]["seq"] if more else None)

    async def ship(
        self, uow: UnitOfWork, exchange_id: str, carrier: str, tracking_number: str, now: datetime
    ) -> Exchange:
        """Goods handed to a carrier: pending -> shipped, once. The same
        shipment again replays it; another one is a conflict."""
        ident = parse_exchange_id(exchange_id)
        carrier = check_text(carrier, "carrier", "CARRIER", required=True).strip()
        tracking = check_text(
            tracking_number, "tracking_number", "TRACKING_NUMBER", required=True
        ).strip()
        conn = uow.conn
        row = await repo.ship_exchange(conn, ident, carrier, tracking, now)
        if row is not None:
            return exchange_of(row)
        found = await repo.exchange(conn, ident)
        if found is None:
            raise unknown_exchange(exchange_id)
        if found["fulfilment"] not in ("issued", "pending", "shipped"):
            raise FailedPrecondition(
                f"mall exchange {exchange_id} is {found['fulfilment']}: nothing ships",
                code="NOT_SHIPPABLE",
                field="exchange_id",
            )
        if found["fulfilment"] == "issued":
            raise FailedPrecondition(
                f"mall exchange {exchange_id} was a coupon, issued at once: nothing ships",
                code="NOT_GOODS",
                field="exchange_id",
            )
        if (found["carrier"], found["tracking_number"]) == (carrier, tracking):
            return exchange_of(found, replayed=True)
        raise Conflict(
            f"mall exchange {exchange_id} already shipped with {found['carrier']}"
            f" {found['tracking_number']}",
            code="ALREADY_SHIPPED",
            field="tracking_number",
        )

    async def exchange(
        self,
        uow: UnitOfWork,
        member_id: str,
        item_id: uuid.UUID,
        exchange_key: str,
        now: datetime,
    ) -> Exchange:
        member = uuid.UUID(parse_member_id(member_id))
        key = check_key(exchange_key, "exchange_key")
        digest = request_hash("mall_exchange", {"member_id": str(member), "item_id": str(item_id)})
        conn = uow.conn
        await refuse_erased(conn, member)
        # One exchange per key: a concurrent retry waits here for the first
        # commit, then replays it.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            f"mall-exchange:{member}:{key}",
        )
        stored = await repo.exchange_by_key(conn, member, key)
        if stored is not None:
            if bytes(stored["request_hash"]) != digest:
                raise Conflict(
                    f"exchange_key {key} was already used for another item",
                    code="IDEMPOTENCY_KEY_REUSED",
                    field="exchange_key",
                )
            return exchange_of(stored, replayed=True)
        # The item as it is now, unlocked: the hot row (a flash sale) is locked
        # only at the end, by the conditional stock UPDATE, so concurrent
        # exchanges of one item queue on it for one statement and the commit,
        # not for the whole ledger posting.
        item = await repo.item(conn, item_id)
        if item is None or not on_sale(item, now):
            raise exchange_refusal(item_state(item), str(item_id), now)
        spec = item.spec
        # Per person: what merged-in ids exchanged counts against the limit.
        person = await merges.person_of(conn, member)
        if not await repo.count_member_exchange(conn, item_id, person, spec.per_member_limit):
            raise limit_reached(str(item_id), spec.per_member_limit)
        exchange_id = uuid.uuid4()
        # A member who never earned has 0 points, not "no account": the refusal
        # is INSUFFICIENT_POINTS (and the account row rolls back with it).
        await ledger.ensure_account(conn, member)
        with_cash = spec.cash_fen > 0
        if with_cash:
            # Reserve: points held until the payment is confirmed or the deadline.
            spent = await self._points.hold(
                uow,
                str(member),
                spec.points_price,
                f"mall:{exchange_id}",
                f"mall:{item_id}",
                now,
                self.payment_ttl,
            )
        else:
            spent = await self._points.redeem(
                uow,
                str(member),
                spec.points_price,
                f"mall:{exchange_id}",
                f"mall:{item_id}",
                now,
            )
        # Not enough points: raised now, so the count rolls back with it.
        spend = spent.unwrap()
        coupon_id = ""
        if spec.kind is ItemKind.COUPON and not with_cash:
            issued = await self._issue_coupon(
                conn,
                template_id=spec.coupon_template_id,
                member_id=member,
                reason=COUPON_REASON_MALL,
                issue_key=f"mall:{exchange_id}",
                now=now,
            )
            coupon_id = issued_coupon_id(issued)
        # Last: one unit of stock, only from the item version priced above.
        if not await repo.take_stock(conn, item_id, now, item.updated_at):
            current = await repo.item(conn, item_id)
            if current is not None and current.updated_at != item.updated_at:
                raise Conflict(
                    f"mall item {item_id} changed during the exchange; retry",
                    code="MALL_ITEM_CHANGED",
                    field="item_id",
                )
            raise exchange_refusal(item_state(current), str(item_id), now)
        row = await repo.insert_exchange(
            conn,
            {
                "id": exchange_id,
                "member_id": member,
                "exchange_key": key,
                "request_hash": digest,
                "item_id": item_id,
                "points": spec.points_price,
                "cash_fen": spec.cash_fen,
                "points_transaction_id": uuid.UUID(spend.transaction_id),
                "coupon_id": coupon_id or None,
                "sku": spec.sku or None,
                "fulfilment": (
                    "awaiting_payment"
                    if with_cash
                    else "issued"
                    if spec.kind is ItemKind.COUPON
                    else "pending"
                ),
                "hold_id": uuid.UUID(spend.hold_id) if with_cash else None,
                "payment_due_at": now + self.payment_ttl if with_cash else None,
                "counted_member_id": person[0],
            },
        )
        assert row is not None, "the key's lock is held: no one else can have inserted it"
        return exchange_of(row)

    # ---- points plus cash: confirm, release, reverse ------------------------------

    async def confirm_payment(
        self,
        uow: UnitOfWork,
        exchange_id: str,
        payment_reference: str,
        now: datetime,
        *,
        member_id: str = "",
        paid_amount_fen: int | None = None,
    ) -> Exchange:
        """The cash part was paid: post the held points and deliver (a coupon
        issued, goods queued), once. The same reference again replays; another
        reference, or one that paid another exchange, is a conflict; past the
        deadline it is PAYMENT_TIMED_OUT (the backend refunds that payment).
        `paid_amount_fen`, when given, must be the exchange's cash_fen (a
        payment of another amount is refused, PAYMENT_AMOUNT_MISMATCH, before
        anything changes, replays included)."""
        ident = parse_exchange_id(exchange_id)
        reference = check_text(
            payment_reference, "payment_reference", "PAYMENT_REFERENCE", required=True
        ).strip()
        conn = uow.conn
        row = await repo.lock_exchange(conn, ident)
        if row is None or (
            member_id
            and row["member_id"]
            not in await merges.person_of(conn, uuid.UUID(parse_member_id(member_id)))
        ):
            raise unknown_exchange(exchange_id)
        if paid_amount_fen is not None and paid_amount_fen != row["cash_fen"]:
            raise FailedPrecondition(
                f"mall exchange {exchange_id} asks {row['cash_fen']} fen in cash"
                f" but the payment was {paid_amount_fen} fen",
                code="PAYMENT_AMOUNT_MISMATCH",
                field="paid_amount_fen",
            )
        if row["payment_reference"] is not None:
            if row["payment_reference"] == reference:
                return exchange_of(row, replayed=True)
            raise Conflict(
                f"mall exchange {exchange_id} was paid with another payment reference",
                code="PAYMENT_ALREADY_CONFIRMED",
                field="payment_reference",
            )
        if row["fulfilment"] != "awaiting_payment":
            raise FailedPrecondition(
                f"mall exchange {exchange_id} is {row['fulfilment']}: no payment is due",
                code="PAYMENT_TIMED_OUT" if row["fulfilment"] == "released" else "NO_PAYMENT_DUE",
                field="exchange_id",
            )
        if now >= row["payment_due_at"]:
            raise FailedPrecondition(
                f"the payment of mall exchange {exchange_id} was due by"
                f" {row['payment_due_at'].isoformat()}",
                code="PAYMENT_TIMED_OUT",
                field="exchange_id",
            )
        other = await repo.exchange_by_payment(conn, reference)
        if other is not None:
            raise Conflict(
                f"payment reference {reference} already paid mall exchange {other['id']}",
                code="PAYMENT_REFERENCE_USED",
                field="payment_reference",
            )
        posted = await self._points.post_hold(uow, str(row["hold_id"]), now)
        posted.unwrap()
        item = await repo.item(conn, row["item_id"])
        assert item is not None, "an exchanged item is never deleted"
        coupon_id: str | None = None
        if item.spec.kind is ItemKind.COUPON:
            issued = await self._issue_coupon(
                conn,
                template_id=item.spec.coupon_template_id,
                member_id=await merges.holder_of(conn, row["member_id"]),
                reason=COUPON_REASON_MALL,
                issue_key=f"mall:{row['id']}",
                now=now,
            )
            coupon_id = issued_coupon_id(issued)
        try:
            done = await repo.confirm_payment(
                conn, ident, reference, now, "issued" if coupon_id else "pending", coupon_id
            )
        except asyncpg.UniqueViolationError:
            # The same reference confirmed another exchange concurrently.
            raise Conflict(
                f"payment reference {reference} already paid another mall exchange",
                code="PAYMENT_REFERENCE_USED",
                field="payment_reference",
            ) from None
        assert done is not None, "locked and awaiting payment"
        return exchange_of(done)

    async def release_unpaid(self, uow: UnitOfWork, exchange_id: uuid.UUID, now: datetime) -> bool:
        """Past its deadline, unpaid: points, stock and count back, once."""
        conn = uow.conn
        row = await repo.lock_exchange(conn, exchange_id)
        if row is None or row["fulfilment"] != "awaiting_payment":
            return False
        if row["payment_due_at"] > now:
            return False
        hold = await ledger.get_hold(conn, row["hold_id"])
        if hold is not None and hold["status"] == "held":
            await self._points.void_hold(uow, str(row["hold_id"]), now)
        await repo.give_back(conn, row["item_id"], row["counted_member_id"])
        return await repo.mark_released(conn, exchange_id, now) is not None

    async def reverse(
        self, uow: UnitOfWork, exchange_id: str, operator_id: str, reason: str, now: datetime
    ) -> Exchange:
        """An operator takes a completed exchange back, once: the points return
        to the member (an operator credit naming the operator and reason), one
        unit of stock and the member's count return, an unused coupon is
        revoked (a used one refuses the reversal). Again: replays."""
        ident = parse_exchange_id(exchange_id)
        operator = check_text(operator_id, "operator_id", "OPERATOR_ID", required=True)
        why = check_text(reason, "reason", "REASON", required=True)
        conn = uow.conn
        row = await repo.lock_exchange(conn, ident)
        if row is None:
            raise unknown_exchange(exchange_id)
        if row["reversed_at"] is not None:
            return exchange_of(row, replayed=True)
        if row["fulfilment"] not in ("issued", "pending", "shipped"):
            raise FailedPrecondition(
                f"mall exchange {exchange_id} is {row['fulfilment']}, not completed",
                code="EXCHANGE_NOT_COMPLETED",
                field="exchange_id",
            )
        if row["coupon_id"]:
            status = await coupon_repository.revoke_coupon(conn, uuid.UUID(row["coupon_id"]))
            # An expired coupon has nothing left to take back.
            if status not in ("revoked", "expired"):
                raise FailedPrecondition(
                    f"the exchange's coupon is {status}: it cannot be taken back",
                    code="COUPON_NOT_REVOCABLE",
                    field="exchange_id",
                )
        holder = await merges.holder_of(conn, row["member_id"])
        credited = await self._points.adjust(
            uow,
            str(holder),
            row["points"],
            operator,
            why,
            f"mall-reversal:{row['id']}",
            now,
        )
        adjustment = credited.unwrap()
        await repo.give_back(conn, row["item_id"], row["counted_member_id"])
        done = await repo.mark_reversed(
            conn, ident, now, operator, why, uuid.UUID(adjustment.transaction_id)
        )
        assert done is not None, "locked, completed and not reversed"
        return exchange_of(done)
