"""Pure rules of the points ledger: lot expiry, pending activation, which lots a
spend consumes, how much a refund reverses, and the canonical hash of a
ledger request. No I/O: handlers feed these with rows read under the member's
lock and write what they return."""

from __future__ import annotations

import enum
import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from servicekit.errors import InvalidArgument

# Month and year ends are the brand's (China Standard Time), not UTC's.
BUSINESS_TZ = ZoneInfo("Asia/Shanghai")
# Far above any real operation (10 million points), far below int64, so sums
# of many operations never overflow either.
MAX_POINTS_PER_OPERATION = 10_000_000
MAX_KEY_LENGTH = 128
MAX_TEXT_LENGTH = 256
HASH_VERSION = 1


class ExpiryKind(enum.StrEnum):
    DAYS = "days"  # N days after earning
    END_OF_MONTH = "end_of_month"  # end of the Nth month after the month of earning
    END_OF_YEAR = "end_of_year"  # end of the Nth year after the year of earning


class ShortfallPolicy(enum.StrEnum):
    DEBT = "debt"  # book what cannot be taken back as debt; later earns repay it
    REPORT = "report"  # take what is left, report the rest to the POS


@dataclass(frozen=True)
class ExpiryPolicy:
    kind: ExpiryKind = ExpiryKind.END_OF_YEAR
    # DAYS: number of days; END_OF_MONTH / END_OF_YEAR: periods after the earning one.
    n: int = 1

    def __post_init__(self) -> None:
        if self.n < 0 or (self.kind is ExpiryKind.DAYS and self.n == 0):
            raise ValueError("an expiry policy needs a positive period")

    def expires_at(self, earned_at: datetime) -> datetime:
        """The first instant at which a lot earned at `earned_at` is expired."""
        if self.kind is ExpiryKind.DAYS:
            return earned_at + timedelta(days=self.n)
        local = earned_at.astimezone(BUSINESS_TZ)
        if self.kind is ExpiryKind.END_OF_YEAR:
            # Lapses when the year after the Nth following year begins.
            start = datetime(local.year + self.n + 1, 1, 1, tzinfo=BUSINESS_TZ)
        else:
            months = local.year * 12 + (local.month - 1) + self.n + 1
            start = datetime(months // 12, months % 12 + 1, 1, tzinfo=BUSINESS_TZ)
        return start.astimezone(UTC)

    def describe(self) -> str:
        return f"{self.kind.value}:{self.n}"

    @classmethod
    def parse(cls, text: str) -> ExpiryPolicy:
        """`days:365`, `end_of_month:12`, `end_of_year:1`."""
        kind, _, n = text.partition(":")
        try:
            return cls(ExpiryKind(kind), int(n or "1"))
        except ValueError:
            raise ValueError(f"expiry policy {text!r} is not kind:n") from None


@dataclass(frozen=True)
class LedgerPolicy:
    expiry: ExpiryPolicy = ExpiryPolicy()
    # Days earned points stay pending (visible, not spendable); 0: spendable at once.
    pending_days: int = 0
    shortfall: ShortfallPolicy = ShortfallPolicy.DEBT
    # PointsExpiringSoon is announced this many days before a lot lapses.
    expiring_soon_days: int = 30
    # A hold that is neither posted nor voided within this time is voided.
    hold_ttl: timedelta = timedelta(minutes=15)

    def activates_at(self, earned_at: datetime) -> datetime | None:
        return earned_at + timedelta(days=self.pending_days) if self.pending_days else None


DEFAULT_POLICY = LedgerPolicy()


@dataclass(frozen=True)
class Lot:
    """A lot as read under the member's lock."""

    lot_id: uuid.UUID
    remaining: int
    status: str
    expires_at: datetime
    activates_at: datetime | None = None
    earned_at: datetime | None = None


@dataclass(frozen=True)
class Take:
    lot_id: uuid.UUID
    points: int


def due_for_expiry(lots: Sequence[Lot], now: datetime) -> list[Lot]:
    """Lots holding points whose expiry has come (pending lots included)."""
    return [
        lot
        for lot in lots
        if lot.status in ("active", "pending") and lot.remaining > 0 and lot.expires_at <= now
    ]


def due_for_activation(lots: Sequence[Lot], now: datetime) -> list[Lot]:
    return [
        lot
        for lot in lots
        if lot.status == "pending"
        and lot.activates_at is not None
        and lot.activates_at <= now
        and lot.expires_at > now
    ]


def allocate(lots: Sequence[Lot], points: int, now: datetime) -> list[Take] | None:
    """Take `points` from the spendable lots, soonest-expiring first (then oldest,
    then by id, so the choice is deterministic); None when they are not enough."""
    spendable = sorted(
        (
            lot
            for lot in lots
            if lot.status == "active" and lot.remaining > 0 and lot.expires_at > now
        ),
        key=lambda lot: (lot.expires_at, lot.earned_at or lot.expires_at, lot.lot_id),
    )
    takes: list[Take] = []
    left = points
    for lot in spendable:
        if left == 0:
            break
        take = min(lot.remaining, left)
        takes.append(Take(lot.lot_id, take))
        left -= take
    return takes if left == 0 else None


def refund_points_due(
    points_earned: int,
    paid_amount_fen: int,
    refunded_before_fen: int,
    refund_fen: int,
    due_before: int,
) -> int:
    """Points this refund reverses: proportional to the amount, computed on the
    cumulative refund so partial refunds never add up to more (or, once the
    whole order is refunded, less) than the order earned. An order nothing was
    paid on (coupons and points covered it) is refunded in full at once."""
    if paid_amount_fen == 0:
        return max(0, points_earned - due_before)
    target = points_earned * (refunded_before_fen + refund_fen) // paid_amount_fen
    return max(0, min(points_earned, target) - due_before)


def check_points(value: int, field: str) -> int:
    """A positive whole number of points within the per-operation limit."""
    if value <= 0:
        raise InvalidArgument(
            f"{field} must be a positive number of points", code="INVALID_POINTS", field=field
        )
    if value > MAX_POINTS_PER_OPERATION:
        raise InvalidArgument(
            f"{field} exceeds the limit of {MAX_POINTS_PER_OPERATION} points per operation",
            code="POINTS_TOO_LARGE",
            field=field,
        )
    return value


def check_key(value: str, field: str = "idempotency_key") -> str:
    if not value.strip():
        raise InvalidArgument(f"{field} is required", code="IDEMPOTENCY_KEY_REQUIRED", field=field)
    if len(value) > MAX_KEY_LENGTH or not value.isprintable():
        raise InvalidArgument(
            f"{field} must be at most {MAX_KEY_LENGTH} printable characters",
            code="INVALID_IDEMPOTENCY_KEY",
            field=field,
        )
    return value


def check_text(value: str, field: str, code: str, *, required: bool) -> str:
    if required and not value.strip():
        raise InvalidArgument(f"{field} is required", code=f"{code}_REQUIRED", field=field)
    if len(value) > MAX_TEXT_LENGTH or not value.isprintable():
        raise InvalidArgument(
            f"{field} must be at most {MAX_TEXT_LENGTH} printable characters",
            code=f"INVALID_{code}",
            field=field,
        )
    return value


def request_hash(operation: str, body: dict[str, object]) -> bytes:
    """SHA-256 of the canonical JSON of a ledger request (sorted keys, UTF-8)."""
    doc = {"v": HASH_VERSION, "op": operation, "body": body}
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(raw.encode()).digest()
