"""The rewards rooms' shared kernel (pure, no I/O): what orders, points,
coupons, referral and the mall all speak of. A member id and a store id as
every room parses them, and an order as the till reports it (its channel and
lines), which checkout settles, earning rules price and coupons discount.

Only what two rooms or more share lives here; each room's own rules stay in
its `domain.py`, so no room has to import a room above it for a word."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime

from servicekit.errors import InvalidArgument

MAX_STORE_ID_LENGTH = 32


class Channel(enum.StrEnum):
    STORE = "store"
    MINI_PROGRAM = "mini_program"
    DELIVERY = "delivery"


@dataclass(frozen=True)
class OrderLine:
    sku: str
    name: str
    category: str
    quantity: int
    paid_amount_fen: int


@dataclass(frozen=True)
class OrderRequest:
    """An order as the till reported it (after protobuf mapping, before validation)."""

    store_id: str
    pos_transaction_id: str
    member_id: str
    channel: Channel | None
    paid_amount_fen: int
    # 0 means "not given" (proto3 cannot tell 0 from unset).
    gross_amount_fen: int = 0
    lines: tuple[OrderLine, ...] = ()
    # None means "not given": the server's clock applies, but the hash keeps None
    # so a retry without a timestamp still matches.
    ordered_at: datetime | None = None
    # Points the member spends on this order (0: none).
    points_to_redeem: int = 0
    # Coupons used on this order; then the lines carry amounts before the
    # coupons and add up to gross_amount_fen (rewards computes the discount).
    coupon_codes: tuple[str, ...] = ()
    # Guide attribution hints, passed through to OrderCompleted (services/guides);
    # not in the request hash: they change nothing rewards settles.
    staff_code: str = ""
    guide_ref: str = ""


def parse_member_id(raw: str, field: str = "member_id") -> str:
    """The canonical (lower-case, hyphenated) form of a member id."""
    if not raw.strip():
        raise InvalidArgument(f"{field} is required", code="MEMBER_ID_REQUIRED", field=field)
    try:
        return str(uuid.UUID(raw.strip()))
    except ValueError:
        raise InvalidArgument(
            f"{field} is not a member id (a UUID)", code="INVALID_MEMBER_ID", field=field
        ) from None


def parse_store_id(raw: str, field: str = "store_id") -> str:
    check_bounded_text(raw, field, "STORE_ID", MAX_STORE_ID_LENGTH)
    return raw


def check_bounded_text(value: str, field: str, code: str, max_length: int) -> None:
    if not value.strip():
        raise InvalidArgument(f"{field} is required", code=f"{code}_REQUIRED", field=field)
    if len(value) > max_length:
        raise InvalidArgument(
            f"{field} is longer than {max_length} characters", code=f"{code}_TOO_LONG", field=field
        )
    if not value.isprintable():
        raise InvalidArgument(
            f"{field} contains control characters", code=f"{code}_NOT_PRINTABLE", field=field
        )
