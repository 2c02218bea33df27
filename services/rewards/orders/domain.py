"""Pure checkout rules: order validation, the earning rule, and the canonical
request hash that makes CompleteOrder idempotent. No I/O."""

from __future__ import annotations

import enum
import hashlib
import json
import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from servicekit.errors import InvalidArgument

FEN_PER_YUAN = 100
# ¥10,000: far above any real tea order, low enough to stop a fat-fingered POS.
DEFAULT_MAX_PAID_AMOUNT_FEN = 1_000_000
MAX_POS_TRANSACTION_ID_LENGTH = 64
MAX_STORE_ID_LENGTH = 32
MAX_LINES = 200
MAX_LINE_QUANTITY = 9_999
MAX_LINE_TEXT_LENGTH = 128
MAX_POINTS_TO_REDEEM = 10_000_000
# Bumped whenever the serialization below changes, so old and new hashes never collide.
REQUEST_HASH_VERSION = 1


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


@dataclass(frozen=True)
class OrderLimits:
    max_paid_amount_fen: int = DEFAULT_MAX_PAID_AMOUNT_FEN


DEFAULT_LIMITS = OrderLimits()


class Rounding(enum.StrEnum):
    FLOOR = "floor"  # only whole yuan earn: ¥9.99 -> 9 yuan
    HALF_UP = "half_up"  # ¥9.50 -> 10 yuan


@dataclass(frozen=True)
class EarningRule:
    """Points for an amount paid: whole yuan (after rounding) times a base rate.

    The name is recorded on every ledger transaction, so a later change of rule
    (tier or channel multipliers, campaigns) stays traceable per transaction.
    """

    name: str
    points_per_yuan: int = 1
    rounding: Rounding = Rounding.FLOOR

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("an earning rule needs a name")
        if self.points_per_yuan < 0:
            raise ValueError("points_per_yuan must be >= 0")

    def points_for(self, paid_amount_fen: int) -> int:
        if paid_amount_fen < 0:
            raise ValueError("paid_amount_fen must be >= 0")
        if self.rounding is Rounding.FLOOR:
            yuan = paid_amount_fen // FEN_PER_YUAN
        else:
            yuan = (paid_amount_fen + FEN_PER_YUAN // 2) // FEN_PER_YUAN
        return yuan * self.points_per_yuan

    def describe(self) -> dict[str, object]:
        """What the ledger stores about the rule that produced a transaction."""
        return {
            "name": self.name,
            "points_per_yuan": self.points_per_yuan,
            "rounding": self.rounding.value,
        }


# 1 point per whole ¥1 paid (the plan's default).
BASE_EARNING_RULE = EarningRule(name="base_1pt_per_yuan")


@dataclass(frozen=True)
class Settlement:
    """A validated order with everything derived from it, ready to be written."""

    order: OrderRequest
    request_hash: bytes
    points: int
    rule: EarningRule
    # What decided `points` (multipliers, campaigns), stored on the transaction.
    rule_doc: dict[str, object] | None = None


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
    _check_text(raw, field, "STORE_ID", MAX_STORE_ID_LENGTH)
    return raw


def _check_text(value: str, field: str, code: str, max_length: int) -> None:
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
    _check_text(
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
        _check_text(value, field, field.upper(), MAX_STORE_TEXT)
    if address:
        _check_text(address, "address", "ADDRESS", MAX_STORE_TEXT)
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
