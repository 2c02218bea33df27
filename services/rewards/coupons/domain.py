"""Pure coupon rules: template terms and their validation, status transitions,
coupon codes, validity, and the discount a coupon gives on a cart. No I/O.

Money is integer fen throughout. A discount is computed on the cart as the till
sent it (line amounts before any coupon), never exceeds the amount it applies
to, and is rounded down to the fen (the brand never gives away a fraction it
did not promise); several stackable coupons together never exceed the cart.
"""

from __future__ import annotations

import enum
import hashlib
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from servicekit.errors import InvalidArgument

# Crockford's base32 without I, L, O, U: nothing a cashier can misread or mistype.
CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# 13 symbols x 5 bits = 65 bits from `secrets`: unguessable, and a collision
# among a billion coupons has odds of about 1 in 10^10.
CODE_LENGTH = 13
MAX_NAME_LENGTH = 64
MAX_ID_LENGTH = 64
MAX_LIST_ITEMS = 200
# Far above any tea order (¥10,000), far below int64.
MAX_FEN = 1_000_000
MAX_VALID_DAYS = 3_660
MAX_STOCK = 100_000_000
MAX_SHARDS = 64
HASH_VERSION = 1


class Kind(enum.StrEnum):
    AMOUNT_OFF = "amount_off"  # threshold_fen, discount_fen: 满99减30
    PERCENT_OFF = "percent_off"  # percent off the eligible amount, cap_fen, optional threshold
    FREE_ITEM = "free_item"  # the cheapest matching unit free, at most max_price_fen
    FIXED_PRICE = "fixed_price"  # one matching unit for price_fen
    FIRST_ORDER_PRICE = "first_order_price"  # percent off one unit, member's first order only


class Status(enum.StrEnum):
    DRAFT = "draft"
    ACTIVE = "active"
    PAUSED = "paused"
    ENDED = "ended"


# Legal template status changes; ENDED is final (issued coupons stay usable).
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.DRAFT: frozenset({Status.ACTIVE, Status.ENDED}),
    Status.ACTIVE: frozenset({Status.PAUSED, Status.ENDED}),
    Status.PAUSED: frozenset({Status.ACTIVE, Status.ENDED}),
    Status.ENDED: frozenset(),
}


class ChannelGroup(enum.StrEnum):
    ONLINE = "online"  # mini-program and delivery orders
    OFFLINE = "offline"  # orders rung up at a store's POS


CHANNEL_GROUP = {
    "store": ChannelGroup.OFFLINE,
    "mini_program": ChannelGroup.ONLINE,
    "delivery": ChannelGroup.ONLINE,
}


class Reason(enum.StrEnum):
    """Why a coupon was issued."""

    JOURNEY = "journey"
    REFERRAL = "referral"
    TIER_BENEFIT = "tier_benefit"
    MALL_EXCHANGE = "mall_exchange"
    OPERATOR_GRANT = "operator_grant"
    REGISTRATION = "registration"
    # The member claimed it (wallet "领券"); only from a claimable template.
    CLAIM = "claim"


@dataclass(frozen=True)
class Terms:
    """What one version of a template promises; issued coupons keep their version's."""

    name: str
    kind: Kind
    # amount_off / percent_off: the eligible amount must reach this (0: none).
    threshold_fen: int = 0
    # amount_off: fen off.
    discount_fen: int = 0
    # percent_off / first_order_price: percent off (1..100).
    percent: int = 0
    # percent_off / first_order_price: most fen off (0: no cap).
    cap_fen: int = 0
    # free_item: the free unit is worth at most this (0: any price).
    max_price_fen: int = 0
    # fixed_price: the unit's price with the coupon.
    price_fen: int = 0
    # Which lines the coupon applies to (empty: every line).
    skus: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    # Where and for whom it can be used (empty: anywhere / anyone).
    store_ids: tuple[str, ...] = ()
    channels: tuple[ChannelGroup, ...] = ()
    tiers: tuple[str, ...] = ()
    # Issued only to members without a settled order.
    new_members_only: bool = False
    # Validity: an absolute window, and/or a span from issue (the earlier end wins).
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    valid_days: int = 0
    valid_hours: int = 0
    stackable: bool = False
    restore_on_refund: bool = False
    # Members may claim it themselves (within stock and their limit).
    claimable: bool = False

    def doc(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind.value
        d["channels"] = [c.value for c in self.channels]
        for k in ("skus", "categories", "store_ids", "tiers"):
            d[k] = list(d[k])
        for k in ("valid_from", "valid_until"):
            d[k] = d[k].isoformat() if d[k] else None
        return d

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Terms:
        """Terms stored by `doc` (trusted: they were validated when written)."""
        d = dict(doc)
        d["kind"] = Kind(d["kind"])
        d["channels"] = tuple(ChannelGroup(c) for c in d.get("channels", ()))
        for k in ("skus", "categories", "store_ids", "tiers"):
            d[k] = tuple(d.get(k, ()))
        for k in ("valid_from", "valid_until"):
            d[k] = datetime.fromisoformat(d[k]) if d.get(k) else None
        return cls(**d)

    def expires_at(self, issued_at: datetime) -> datetime:
        """When a coupon issued at `issued_at` stops being usable."""
        ends = []
        if self.valid_until is not None:
            ends.append(self.valid_until)
        if self.valid_days or self.valid_hours:
            ends.append(issued_at + timedelta(days=self.valid_days, hours=self.valid_hours))
        return min(ends)

    def starts_at(self, issued_at: datetime) -> datetime:
        return max(issued_at, self.valid_from) if self.valid_from else issued_at


@dataclass(frozen=True)
class Limits:
    """A template's promises to finance (None: unlimited)."""

    total_stock: int | None = None
    per_member_limit: int | None = None
    daily_budget: int | None = None
    # Stock counter rows; more shards spread concurrent claims (≥ 3,000/s).
    stock_shards: int = 1


# ---- validation ----------------------------------------------------------------


def _bad(field: str, message: str, code: str) -> InvalidArgument:
    return InvalidArgument(f"{field} {message}", code=code, field=field)


def _fen(value: int, field: str, *, positive: bool = False) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(field, "must be an integer number of fen", "INVALID_AMOUNT")
    if value < 0 or (positive and value == 0):
        raise _bad(
            field, "must be positive" if positive else "must not be negative", "INVALID_AMOUNT"
        )
    if value > MAX_FEN:
        raise _bad(field, f"exceeds {MAX_FEN} fen", "AMOUNT_TOO_LARGE")
    return value


def _texts(values: Sequence[str], field: str) -> tuple[str, ...]:
    if len(values) > MAX_LIST_ITEMS:
        raise _bad(field, f"has more than {MAX_LIST_ITEMS} items", "TOO_MANY_ITEMS")
    out = []
    for n, v in enumerate(values):
        if not v.strip() or len(v) > MAX_ID_LENGTH or not v.isprintable():
            raise _bad(
                f"{field}[{n}]",
                f"must be 1 to {MAX_ID_LENGTH} printable characters",
                "INVALID_ITEM",
            )
        out.append(v)
    return tuple(dict.fromkeys(out))


def validate_terms(t: Terms) -> Terms:
    """The terms, or InvalidArgument naming the first bad field (checked in a fixed order)."""
    if not t.name.strip() or len(t.name) > MAX_NAME_LENGTH or not t.name.isprintable():
        raise _bad("name", f"must be 1 to {MAX_NAME_LENGTH} printable characters", "INVALID_NAME")
    for f in ("threshold_fen", "discount_fen", "cap_fen", "max_price_fen", "price_fen"):
        _fen(getattr(t, f), f)
    if not isinstance(t.percent, int) or not 0 <= t.percent <= 100:
        raise _bad("percent", "must be an integer between 1 and 100", "INVALID_PERCENT")
    kind = t.kind
    if kind is Kind.AMOUNT_OFF:
        _fen(t.discount_fen, "discount_fen", positive=True)
        if t.threshold_fen and t.discount_fen > t.threshold_fen:
            raise _bad("discount_fen", "must not exceed threshold_fen", "DISCOUNT_ABOVE_THRESHOLD")
    if kind is Kind.PERCENT_OFF and not t.percent:
        raise _bad("percent", "must be between 1 and 100", "INVALID_PERCENT")
    if kind is Kind.FIRST_ORDER_PRICE and not (t.percent or t.price_fen):
        raise _bad("percent", "or price_fen is required", "INVALID_PERCENT")
    if kind is Kind.FIXED_PRICE and not (t.skus or t.categories):
        raise _bad(
            "skus", "or categories must name the item sold at a fixed price", "ITEM_REQUIRED"
        )
    if kind is Kind.FREE_ITEM and not (t.skus or t.categories):
        raise _bad("skus", "or categories must name the item given free", "ITEM_REQUIRED")
    skus, categories = _texts(t.skus, "skus"), _texts(t.categories, "categories")
    stores, tiers = _texts(t.store_ids, "store_ids"), _texts(t.tiers, "tiers")
    for f in ("valid_from", "valid_until"):
        v = getattr(t, f)
        if v is not None and v.tzinfo is None:
            raise _bad(f, "needs a UTC offset (RFC 3339)", "TIME_WITHOUT_OFFSET")
    if not 0 <= t.valid_days <= MAX_VALID_DAYS:
        raise _bad("valid_days", f"must be between 0 and {MAX_VALID_DAYS}", "INVALID_VALIDITY")
    if not 0 <= t.valid_hours <= 24 * MAX_VALID_DAYS:
        raise _bad("valid_hours", "must not be negative", "INVALID_VALIDITY")
    if t.valid_until is None and not (t.valid_days or t.valid_hours):
        raise _bad(
            "valid_until",
            "or valid_days/valid_hours is required: a coupon must expire",
            "VALIDITY_REQUIRED",
        )
    if t.valid_from and t.valid_until and t.valid_until <= t.valid_from:
        raise _bad("valid_until", "must be after valid_from", "INVALID_VALIDITY")
    return Terms(
        **{
            **asdict(t),
            "kind": kind,
            "skus": skus,
            "categories": categories,
            "store_ids": stores,
            "tiers": tiers,
            "channels": tuple(dict.fromkeys(t.channels)),
        }
    )


def validate_limits(lim: Limits) -> Limits:
    for f in ("total_stock", "per_member_limit", "daily_budget"):
        v = getattr(lim, f)
        if v is not None and not (isinstance(v, int) and 0 < v <= MAX_STOCK):
            raise _bad(
                f, f"must be between 1 and {MAX_STOCK} (or unset: unlimited)", "INVALID_LIMIT"
            )
    if not 1 <= lim.stock_shards <= MAX_SHARDS:
        raise _bad("stock_shards", f"must be between 1 and {MAX_SHARDS}", "INVALID_SHARDS")
    return lim


def check_transition(current: Status, wanted: Status) -> None:
    if wanted not in TRANSITIONS[current]:
        raise InvalidArgument(
            f"a {current.value} template cannot become {wanted.value}",
            code="ILLEGAL_STATUS_TRANSITION",
            field="status",
        )


def shard_stock(total: int, shards: int) -> list[int]:
    """Split a stock over `shards` counters; the parts add up to `total` exactly."""
    shards = min(shards, total) or 1
    base, extra = divmod(total, shards)
    return [base + (1 if n < extra else 0) for n in range(shards)]


def new_code() -> str:
    # One draw of 65 random bits, 5 per symbol (the alphabet has 32): the same
    # uniform code as a choice per symbol, with one urandom call instead of 13
    # (a batch of 1,000 issues spent ~0.1 s of CPU on those calls).
    bits = secrets.randbits(5 * CODE_LENGTH)
    return "".join(CODE_ALPHABET[(bits >> (5 * n)) & 31] for n in range(CODE_LENGTH))


def normalize_code(raw: str) -> str:
    """What a cashier typed, as stored: upper case, no spaces or dashes, and the
    look-alikes Crockford maps (O->0, I/L->1)."""
    s = raw.strip().upper().replace("-", "").replace(" ", "")
    return s.translate(str.maketrans("OIL", "011"))


def issue_hash(template_id: str, member_id: str, reason: str, issued_by: str = "") -> bytes:
    """Every field of an issue request that changes what is written; the
    operator only when given, so hashes of unattributed issues stay the same."""
    body = {"v": HASH_VERSION, "template_id": template_id, "member_id": member_id, "reason": reason}
    if issued_by:
        body["issued_by"] = issued_by
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()


# ---- discount arithmetic -------------------------------------------------------


@dataclass(frozen=True)
class CartLine:
    sku: str
    category: str
    quantity: int
    # The line's amount before coupons, in fen; a unit is worth amount // quantity
    # (the last unit carries the remainder).
    amount_fen: int

    def units(self) -> list[int]:
        unit, rest = divmod(self.amount_fen, self.quantity)
        return [unit] * (self.quantity - 1) + [unit + rest]


@dataclass(frozen=True)
class Cart:
    store_id: str
    channel: str  # store | mini_program | delivery
    lines: tuple[CartLine, ...]
    tier: str | None = None
    first_order: bool = False

    @property
    def gross_fen(self) -> int:
        return sum(line.amount_fen for line in self.lines)


@dataclass(frozen=True)
class Verdict:
    """A coupon on a cart: the discount it gives, or why it does not apply."""

    discount_fen: int = 0
    reason: str = ""  # UPPER_SNAKE code when not applicable
    detail: str = ""

    @property
    def applicable(self) -> bool:
        return not self.reason


def _no(reason: str, detail: str) -> Verdict:
    return Verdict(0, reason, detail)


def _matches(t: Terms, line: CartLine) -> bool:
    if not (t.skus or t.categories):
        return True
    return line.sku in t.skus or line.category in t.categories


def discount(t: Terms, cart: Cart) -> Verdict:
    """The discount `t` gives on `cart` (0 <= discount <= the amount it applies to)."""
    if t.store_ids and cart.store_id not in t.store_ids:
        return _no("STORE_NOT_ELIGIBLE", f"not valid at store {cart.store_id}")
    group = CHANNEL_GROUP.get(cart.channel)
    if t.channels and group not in t.channels:
        return _no("CHANNEL_NOT_ELIGIBLE", f"not valid for {cart.channel} orders")
    if t.tiers and cart.tier not in t.tiers:
        return _no("TIER_NOT_ELIGIBLE", f"only for tiers {', '.join(t.tiers)}")
    if t.kind is Kind.FIRST_ORDER_PRICE and not cart.first_order:
        return _no("NOT_FIRST_ORDER", "only on the member's first order")
    eligible = [line for line in cart.lines if _matches(t, line)]
    eligible_fen = sum(line.amount_fen for line in eligible)
    if not eligible or eligible_fen == 0:
        return _no("NO_ELIGIBLE_ITEMS", "no item in the cart is covered by the coupon")
    if t.threshold_fen and eligible_fen < t.threshold_fen:
        return _no(
            "BELOW_THRESHOLD",
            f"needs {t.threshold_fen} fen of eligible items, cart has {eligible_fen}",
        )
    units = sorted(u for line in eligible for u in line.units())
    if t.kind is Kind.AMOUNT_OFF:
        off = t.discount_fen
    elif t.kind is Kind.PERCENT_OFF:
        off = eligible_fen * t.percent // 100
    elif t.kind is Kind.FREE_ITEM:
        off = units[0]
        if t.max_price_fen:
            off = min(off, t.max_price_fen)
    elif t.kind is Kind.FIXED_PRICE:
        off = max(units[-1] - t.price_fen, 0)
        if off == 0:
            return _no("NO_SAVING", f"the item already costs at most {t.price_fen} fen")
    else:  # first order: percent off (or a fixed price for) the dearest eligible unit
        unit = units[-1]
        off = unit * t.percent // 100 if t.percent else max(unit - t.price_fen, 0)
    if t.cap_fen:
        off = min(off, t.cap_fen)
    return Verdict(min(off, eligible_fen))


def combine(terms: Sequence[Terms], cart: Cart) -> tuple[int, list[Verdict]]:
    """Several coupons on one cart: all must be stackable (one coupon per order
    otherwise); each is computed on the cart, the total never exceeds it."""
    verdicts = [discount(t, cart) for t in terms]
    if len(terms) > 1:
        verdicts = [
            v
            if not v.applicable or t.stackable
            else _no("NOT_STACKABLE", "one coupon per order: this one does not stack")
            for t, v in zip(terms, verdicts, strict=True)
        ]
    total = min(sum(v.discount_fen for v in verdicts if v.applicable), cart.gross_fen)
    return total, verdicts


def best(verdicts: Mapping[str, Verdict]) -> str:
    """The code giving the largest discount ("" when none applies); ties go to
    the first in the given order (the one expiring soonest, as the caller sorts)."""
    top, top_off = "", 0
    for code, v in verdicts.items():
        if v.applicable and v.discount_fen > top_off:
            top, top_off = code, v.discount_fen
    return top


def spread(amounts: Sequence[int], off: int) -> list[int]:
    """`amounts` minus `off`, spread in proportion (largest remainder, exact in fen),
    so earning rules that look at lines see what was actually paid on each."""
    total = sum(amounts)
    if not total or not off:
        return list(amounts)
    shares = [a * off // total for a in amounts]
    rest = off - sum(shares)
    order = sorted(range(len(amounts)), key=lambda n: -(amounts[n] * off % total))
    for n in order[:rest]:
        shares[n] += 1
    return [a - s for a, s in zip(amounts, shares, strict=True)]


@dataclass(frozen=True)
class TemplateView:
    """A template as operators see it."""

    template_id: str
    version: int
    status: Status
    terms: Terms
    limits: Limits
    created_at: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict)
