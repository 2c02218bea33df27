"""Points mall rules: what an item is, which status moves are allowed, why an
exchange is refused. Pure: no I/O; handlers.py applies them.

An item is a coupon template or goods with a SKU, priced in points and
optionally points + cash (the cash is recorded on the exchange and paid
elsewhere). Stock and the per-member limit are enforced by conditional
updates in handlers.py; these rules only name the refusal.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime

from servicekit.errors import FailedPrecondition, InvalidArgument, NotFound

from ..points.domain import MAX_POINTS_PER_OPERATION, check_text

MAX_STOCK = 10_000_000
MAX_CASH_FEN = 10_000_00
MAX_PER_MEMBER = 1000


class ItemKind(enum.StrEnum):
    COUPON = "coupon"
    GOODS = "goods"


class ItemStatus(enum.StrEnum):
    DRAFT = "draft"
    ACTIVE = "active"
    PAUSED = "paused"
    ENDED = "ended"


# Ended is final: an item's exchanges stay, the item is never sold again.
TRANSITIONS: dict[ItemStatus, frozenset[ItemStatus]] = {
    ItemStatus.DRAFT: frozenset({ItemStatus.ACTIVE, ItemStatus.ENDED}),
    ItemStatus.ACTIVE: frozenset({ItemStatus.PAUSED, ItemStatus.ENDED}),
    ItemStatus.PAUSED: frozenset({ItemStatus.ACTIVE, ItemStatus.ENDED}),
    ItemStatus.ENDED: frozenset(),
}


@dataclass(frozen=True)
class ItemSpec:
    """An item as an operator writes it (create, or the new version on update)."""

    name: str
    kind: ItemKind
    points_price: int
    cash_fen: int
    stock_total: int
    per_member_limit: int  # 0: no limit
    coupon_template_id: str = ""
    sku: str = ""
    starts_at: datetime | None = None
    ends_at: datetime | None = None


def parse_kind(raw: str) -> ItemKind:
    try:
        return ItemKind(raw)
    except ValueError:
        raise InvalidArgument(
            f"kind must be one of {', '.join(k.value for k in ItemKind)}",
            code="INVALID_ITEM_KIND",
            field="kind",
        ) from None


def parse_status(raw: str) -> ItemStatus:
    try:
        return ItemStatus(raw)
    except ValueError:
        raise InvalidArgument(
            f"status must be one of {', '.join(s.value for s in ItemStatus)}",
            code="INVALID_ITEM_STATUS",
            field="status",
        ) from None


def parse_item_id(raw: str, field: str = "item_id") -> uuid.UUID:
    if not raw.strip():
        raise InvalidArgument(f"{field} is required", code="ITEM_ID_REQUIRED", field=field)
    try:
        return uuid.UUID(raw.strip())
    except ValueError:
        raise InvalidArgument(
            f"{field} is not a mall item id (a UUID)", code="INVALID_ITEM_ID", field=field
        ) from None


def parse_exchange_id(raw: str, field: str = "exchange_id") -> uuid.UUID:
    if not raw.strip():
        raise InvalidArgument(f"{field} is required", code="EXCHANGE_ID_REQUIRED", field=field)
    try:
        return uuid.UUID(raw.strip())
    except ValueError:
        raise InvalidArgument(
            f"{field} is not a mall exchange id (a UUID)", code="INVALID_EXCHANGE_ID", field=field
        ) from None


def _bounded(value: int, field: str, code: str, low: int, high: int) -> int:
    if not low <= value <= high:
        raise InvalidArgument(f"{field} must be between {low} and {high}", code=code, field=field)
    return value


def check_item(spec: ItemSpec) -> ItemSpec:
    """Refuse an item that cannot be sold as written, naming the field."""
    check_text(spec.name, "name", "NAME", required=True)
    _bounded(spec.points_price, "points_price", "INVALID_POINTS_PRICE", 1, MAX_POINTS_PER_OPERATION)
    _bounded(spec.cash_fen, "cash_fen", "INVALID_CASH_FEN", 0, MAX_CASH_FEN)
    _bounded(spec.stock_total, "stock_total", "INVALID_STOCK", 0, MAX_STOCK)
    _bounded(
        spec.per_member_limit, "per_member_limit", "INVALID_PER_MEMBER_LIMIT", 0, MAX_PER_MEMBER
    )
    if spec.kind is ItemKind.COUPON:
        check_text(
            spec.coupon_template_id, "coupon_template_id", "COUPON_TEMPLATE_ID", required=True
        )
        if spec.sku:
            raise InvalidArgument("a coupon item has no sku", code="SKU_NOT_ALLOWED", field="sku")
    else:
        check_text(spec.sku, "sku", "SKU", required=True)
        if spec.coupon_template_id:
            raise InvalidArgument(
                "a goods item has no coupon template",
                code="COUPON_TEMPLATE_NOT_ALLOWED",
                field="coupon_template_id",
            )
    if spec.starts_at and spec.ends_at and spec.ends_at <= spec.starts_at:
        raise InvalidArgument(
            "ends_at must be after starts_at", code="INVALID_WINDOW", field="ends_at"
        )
    return spec


def check_transition(current: ItemStatus, wanted: ItemStatus) -> None:
    if wanted is not current and wanted not in TRANSITIONS[current]:
        raise FailedPrecondition(
            f"an item that is {current.value} cannot become {wanted.value}",
            code="INVALID_STATUS_TRANSITION",
            field="status",
        )


@dataclass(frozen=True)
class ItemState:
    """An item as the exchange found it after its conditional update failed."""

    status: ItemStatus
    stock_remaining: int
    starts_at: datetime | None
    ends_at: datetime | None


def exchange_refusal(item: ItemState | None, item_id: str, now: datetime) -> Exception:
    """Why the stock could not be taken: the item is unknown, not on sale, or sold out."""
    if item is None:
        return NotFound(
            f"mall item {item_id} does not exist", code="UNKNOWN_MALL_ITEM", field="item_id"
        )
    if item.status is not ItemStatus.ACTIVE:
        return FailedPrecondition(
            f"mall item {item_id} is {item.status.value}",
            code="MALL_ITEM_NOT_ACTIVE",
            field="item_id",
        )
    if (item.starts_at and now < item.starts_at) or (item.ends_at and now >= item.ends_at):
        return FailedPrecondition(
            f"mall item {item_id} is not on sale now",
            code="MALL_ITEM_OUT_OF_WINDOW",
            field="item_id",
        )
    return FailedPrecondition(
        f"mall item {item_id} is out of stock", code="MALL_ITEM_OUT_OF_STOCK", field="item_id"
    )


def limit_reached(item_id: str, limit: int) -> FailedPrecondition:
    return FailedPrecondition(
        f"a member may exchange mall item {item_id} at most {limit} time(s)",
        code="MALL_MEMBER_LIMIT_REACHED",
        field="item_id",
    )


def stock_after_resize(total: int, remaining: int, new_total: int) -> int:
    """Remaining stock when an operator changes the total: what was already
    sold stays sold; shrinking below it is refused."""
    sold = total - remaining
    if new_total < sold:
        raise FailedPrecondition(
            f"{sold} already exchanged; stock_total cannot go below that",
            code="STOCK_BELOW_EXCHANGED",
            field="stock_total",
        )
    return new_total - sold
