"""Use cases of the points mall, each given a unit of work.

An exchange, in the caller's one transaction: the (member, exchange key)
lock and replay check, one unit of stock (conditional UPDATE), the member's
count (conditional UPSERT), the points through the ledger's own `redeem`
(double-entry, lots, idempotency), then the item: a coupon through
`issue_coupon` or a goods fulfilment record. Any refusal raises, and the unit
of work rolls everything back: stock, count and points are untouched.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from servicekit.db import Connection, UnitOfWork
from servicekit.errors import Conflict, FailedPrecondition, InvalidArgument, NotFound

from .. import merges
from ..coupons import repository as coupon_repository
from ..orders.domain import parse_member_id
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
    )


FULFILMENTS = ("issued", "pending", "shipped")


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


class PointsMall:
    def __init__(self, points: PointsLedger, issue_coupon: CouponIssuer) -> None:
        self._points = points
        self._issue_coupon = issue_coupon

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
            raise NotFound(
                f"mall exchange {exchange_id} does not exist",
                code="UNKNOWN_MALL_EXCHANGE",
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
        if spec.kind is ItemKind.COUPON:
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
                "fulfilment": "issued" if spec.kind is ItemKind.COUPON else "pending",
            },
        )
        assert row is not None, "the key's lock is held: no one else can have inserted it"
        return exchange_of(row)
