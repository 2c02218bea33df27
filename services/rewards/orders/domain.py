"""Pure checkout rules: order validation, the settlement it plans (with the
earning rule of points/earning.py), and the canonical request hash that makes
CompleteOrder idempotent. No I/O. The order's own types and the id parsers
are the rooms' shared kernel (services/rewards/kernel.py)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from servicekit.errors import InvalidArgument

from ..kernel import (
    OrderRequest,
    check_bounded_text,
    parse_member_id,
    parse_store_id,
)
from ..points.earning import BASE_EARNING_RULE, EarningRule

# ¥10,000: far above any real tea order, low enough to stop a fat-fingered POS.
DEFAULT_MAX_PAID_AMOUNT_FEN = 1_000_000
MAX_POS_TRANSACTION_ID_LENGTH = 64
MAX_LINES = 200
MAX_LINE_QUANTITY = 9_999
MAX_LINE_TEXT_LENGTH = 128
MAX_POINTS_TO_REDEEM = 10_000_000
# Bumped whenever the serialization below changes, so old and new hashes never collide.
REQUEST_HASH_VERSION = 1


@dataclass(frozen=True)
class OrderLimits:
    max_paid_amount_fen: int = DEFAULT_MAX_PAID_AMOUNT_FEN


DEFAULT_LIMITS = OrderLimits()


@dataclass(frozen=True)
class Settlement:
    """A validated order with everything derived from it, ready to be written."""

    order: OrderRequest
    request_hash: bytes
    points: int
    rule: EarningRule
    # What decided `points` (multipliers, campaigns), stored on the transaction.
    rule_doc: dict[str, object] | None = None


def _check_amount(value: int, field: str) -> None:
    if value < 0:
        raise InvalidArgument(f"{field} must not be negative", code="NEGATIVE_AMOUNT", field=field)


def _check_lines(order: OrderRequest) -> None:
    if len(order.lines) > MAX_LINES:
        raise InvalidArgument(
            f"an order has at most {MAX_LINES} lines", code="TOO_MANY_LINES", field="lines"
        )
    for n, line in enumerate(order.lines):
        prefix = f"lines[{n}]"
        for name in ("sku", "name", "category"):
            if len(getattr(line, name)) > MAX_LINE_TEXT_LENGTH:
                raise InvalidArgument(
                    f"{prefix}.{name} is longer than {MAX_LINE_TEXT_LENGTH} characters",
                    code="LINE_FIELD_TOO_LONG",
                    field=f"{prefix}.{name}",
                )
        if not 1 <= line.quantity <= MAX_LINE_QUANTITY:
            raise InvalidArgument(
                f"{prefix}.quantity must be between 1 and {MAX_LINE_QUANTITY}",
                code="INVALID_QUANTITY",
                field=f"{prefix}.quantity",
            )
        _check_amount(line.paid_amount_fen, f"{prefix}.paid_amount_fen")
    if order.lines and order.coupon_codes:
        total = sum(line.paid_amount_fen for line in order.lines)
        if total != order.gross_amount_fen:
            raise InvalidArgument(
                f"lines add up to {total} fen but gross_amount_fen is {order.gross_amount_fen}"
                " (with coupons, lines carry amounts before the coupons)",
                code="LINES_TOTAL_MISMATCH",
                field="lines",
            )
    elif order.lines:
        total = sum(line.paid_amount_fen for line in order.lines)
        if total != order.paid_amount_fen:
            raise InvalidArgument(
                f"lines add up to {total} fen but paid_amount_fen is {order.paid_amount_fen}",
                code="LINES_TOTAL_MISMATCH",
                field="lines",
            )


def validate_order(order: OrderRequest, limits: OrderLimits = DEFAULT_LIMITS) -> OrderRequest:
    """The order with its member id canonical, or InvalidArgument naming the field.

    Checks run in a fixed order, so one bad request always reports the same field.
    """
    check_bounded_text(
        order.pos_transaction_id,
        "pos_transaction_id",
        "POS_TRANSACTION_ID",
        MAX_POS_TRANSACTION_ID_LENGTH,
    )
    parse_store_id(order.store_id)
    member_id = parse_member_id(order.member_id)
    if order.channel is None:
        raise InvalidArgument("channel is required", code="CHANNEL_REQUIRED", field="channel")
    _check_amount(order.paid_amount_fen, "paid_amount_fen")
    if order.paid_amount_fen > limits.max_paid_amount_fen:
        raise InvalidArgument(
            f"paid_amount_fen {order.paid_amount_fen} exceeds the limit of"
            f" {limits.max_paid_amount_fen} fen per order",
            code="ORDER_AMOUNT_TOO_LARGE",
            field="paid_amount_fen",
        )
    _check_amount(order.gross_amount_fen, "gross_amount_fen")
    if order.gross_amount_fen and order.gross_amount_fen < order.paid_amount_fen:
        raise InvalidArgument(
            "gross_amount_fen (before discounts) is less than paid_amount_fen",
            code="GROSS_BELOW_PAID",
            field="gross_amount_fen",
        )
    if order.coupon_codes and not order.lines:
        raise InvalidArgument(
            "an order with coupons needs its lines (the discount is computed on them)",
            code="COUPON_NEEDS_LINES",
            field="lines",
        )
    _check_lines(order)
    if order.points_to_redeem < 0:
        raise InvalidArgument(
            "points_to_redeem must not be negative",
            code="INVALID_POINTS",
            field="points_to_redeem",
        )
    if order.points_to_redeem > MAX_POINTS_TO_REDEEM:
        raise InvalidArgument(
            f"points_to_redeem exceeds the limit of {MAX_POINTS_TO_REDEEM} points per order",
            code="POINTS_TOO_LARGE",
            field="points_to_redeem",
        )
    if member_id == order.member_id:
        return order
    return OrderRequest(
        store_id=order.store_id,
        pos_transaction_id=order.pos_transaction_id,
        member_id=member_id,
        channel=order.channel,
        paid_amount_fen=order.paid_amount_fen,
        gross_amount_fen=order.gross_amount_fen,
        lines=order.lines,
        ordered_at=order.ordered_at,
        points_to_redeem=order.points_to_redeem,
        coupon_codes=order.coupon_codes,
        staff_code=order.staff_code,
        guide_ref=order.guide_ref,
    )


def _utc_iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat(timespec="microseconds")


def canonical_request(order: OrderRequest) -> bytes:
    """Deterministic serialization of everything the caller sent.

    Sorted keys, no whitespace, UTF-8, timestamps in UTC with microseconds;
    line order is kept (a reordered body is a different body).
    """
    doc = {
        "v": REQUEST_HASH_VERSION,
        "store_id": order.store_id,
        "pos_transaction_id": order.pos_transaction_id,
        "member_id": order.member_id,
        "channel": order.channel.value if order.channel else None,
        "paid_amount_fen": order.paid_amount_fen,
        "gross_amount_fen": order.gross_amount_fen,
        "lines": [
            [line.sku, line.name, line.category, line.quantity, line.paid_amount_fen]
            for line in order.lines
        ],
        "ordered_at": _utc_iso(order.ordered_at),
    }
    # Only when used, so hashes of orders without points stay what they were.
    if order.points_to_redeem:
        doc["points_to_redeem"] = order.points_to_redeem
    if order.coupon_codes:
        doc["coupon_codes"] = list(order.coupon_codes)
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def request_hash(order: OrderRequest) -> bytes:
    """SHA-256 of the canonical request: a retry must carry the same hash."""
    return hashlib.sha256(canonical_request(order)).digest()


def plan_settlement(
    order: OrderRequest,
    limits: OrderLimits = DEFAULT_LIMITS,
    rule: EarningRule = BASE_EARNING_RULE,
) -> Settlement:
    valid = validate_order(order, limits)
    return Settlement(
        order=valid,
        request_hash=request_hash(valid),
        points=rule.points_for(valid.paid_amount_fen),
        rule=rule,
    )


# ---- stores (operator-managed data) ---------------------------------------------------

STORE_STATUSES = ("active", "closed")
MAX_STORE_TEXT = 200


def check_store(
    store_id: str,
    name: str,
    city: str,
    address: str,
    time_zone: str,
    latitude: float,
    longitude: float,
) -> None:
    """A store as an operator writes it; the first bad field is named."""
    parse_store_id(store_id)
    if not store_id.replace("-", "").replace("_", "").isalnum() or not store_id.isascii():
        raise InvalidArgument(
            "store_id: ASCII letters, digits, '-' and '_' only",
            code="INVALID_STORE_ID",
            field="store_id",
        )
    for value, field in ((name, "name"), (city, "city")):
        check_bounded_text(value, field, field.upper(), MAX_STORE_TEXT)
    if address:
        check_bounded_text(address, "address", "ADDRESS", MAX_STORE_TEXT)
    try:
        ZoneInfo(time_zone)
    except (ValueError, ZoneInfoNotFoundError):
        raise InvalidArgument(
            f"time_zone {time_zone!r} is not an IANA time zone (e.g. Asia/Shanghai)",
            code="INVALID_TIME_ZONE",
            field="time_zone",
        ) from None
    bounds: tuple[tuple[float, str, float], ...] = (
        (latitude, "latitude", 90.0),
        (longitude, "longitude", 180.0),
    )
    for degrees, axis, bound in bounds:
        if not (math.isfinite(degrees) and -bound <= degrees <= bound):
            raise InvalidArgument(
                f"{axis} must be WGS-84 degrees within ±{bound:g}",
                code="INVALID_LOCATION",
                field=axis,
            )


def parse_store_status(raw: str) -> str:
    if raw not in STORE_STATUSES:
        raise InvalidArgument(
            f"status must be one of {', '.join(STORE_STATUSES)}",
            code="INVALID_STORE_STATUS",
            field="status",
        )
    return raw
