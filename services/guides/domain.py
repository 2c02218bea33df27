"""Pure rules of the guides context, no I/O: staff roles, WeCom callback
messages, the signed guide link, order attribution, rule tags and the funnel's
stages."""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

from servicekit.errors import InvalidArgument, PermissionDenied

MAX_ID_LENGTH = 64
MAX_TAG_LENGTH = 32


class Role(enum.StrEnum):
    GUIDE = "guide"
    STORE_MANAGER = "store_manager"
    OPERATIONS = "operations"


def parse_role(value: str, field: str = "role") -> Role:
    try:
        return Role(value)
    except ValueError:
        raise InvalidArgument(
            f"role must be one of {', '.join(r.value for r in Role)}",
            code="INVALID_ROLE",
            field=field,
        ) from None


def require_id(value: str, field: str) -> str:
    """A WeCom user id, store id or staff code: present, short, printable."""
    value = value.strip()
    if not value:
        raise InvalidArgument(f"{field} is required", code="MISSING_FIELD", field=field)
    if len(value) > MAX_ID_LENGTH or not value.isprintable():
        raise InvalidArgument(
            f"{field} must be at most {MAX_ID_LENGTH} printable characters",
            code="INVALID_ID",
            field=field,
        )
    return value


def normalise_tag(value: str, field: str = "tag") -> str:
    tag = value.strip()
    if not tag:
        raise InvalidArgument("tag is required", code="MISSING_TAG", field=field)
    if len(tag) > MAX_TAG_LENGTH or not tag.isprintable():
        raise InvalidArgument(
            f"a tag is at most {MAX_TAG_LENGTH} printable characters",
            code="INVALID_TAG",
            field=field,
        )
    return tag


# ---------------------------------------------------------------- WeCom messages


def parse_xml(raw: bytes, field: str) -> dict[str, str]:
    """A flat WeCom XML document as {element: text}. Expat >= 2.4 bounds entity
    expansion and ElementTree resolves no external entities; a DOCTYPE has no
    business in a WeCom message, so it is refused outright."""
    if b"<!DOCTYPE" in raw.upper() or b"<!ENTITY" in raw.upper():
        raise InvalidArgument("XML with a DOCTYPE is refused", code="INVALID_XML", field=field)
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as exc:
        raise InvalidArgument(f"not XML: {exc}", code="INVALID_XML", field=field) from None
    return {child.tag: (child.text or "").strip() for child in root}


@dataclass(frozen=True)
class WeComEvent:
    """A decrypted callback event, with the key that makes processing idempotent."""

    event: str
    change_type: str
    staff_id: str
    external_userid: str
    chat_id: str
    create_time: int
    state: str
    fields: dict[str, str]

    @property
    def dedup_key(self) -> str:
        """WeCom retries a callback it got no answer to, with the same content;
        the same event is the same (type, change, staff, customer, chat, time)."""
        raw = "|".join(
            [
                self.event,
                self.change_type,
                self.staff_id,
                self.external_userid,
                self.chat_id,
                str(self.create_time),
            ]
        )
        return hashlib.sha256(raw.encode()).hexdigest()


def parse_event(message: bytes) -> WeComEvent:
    fields = parse_xml(message, "Encrypt")
    try:
        create_time = int(fields.get("CreateTime", "0"))
    except ValueError:
        raise InvalidArgument(
            "CreateTime is not a number", code="INVALID_CALLBACK", field="CreateTime"
        ) from None
    return WeComEvent(
        event=fields.get("Event", ""),
        change_type=fields.get("ChangeType", ""),
        staff_id=fields.get("UserID", ""),
        external_userid=fields.get("ExternalUserID", ""),
        chat_id=fields.get("ChatId", ""),
        create_time=create_time,
        state=fields.get("State", ""),
        fields=fields,
    )


def check_age(timestamp: str, now: datetime, max_age: timedelta) -> None:
    """The callback's timestamp within max_age of now (either way: clocks drift)."""
    try:
        sent = int(timestamp)
    except ValueError:
        raise InvalidArgument(
            "timestamp is not a number", code="INVALID_TIMESTAMP", field="timestamp"
        ) from None
    if abs(now.timestamp() - sent) > max_age.total_seconds():
        raise InvalidArgument(
            f"the callback is older than {int(max_age.total_seconds())} s (or from the future)",
            code="CALLBACK_TOO_OLD",
            field="timestamp",
        )


# ---------------------------------------------------------------- guide links


def sign_guide_ref(secret: bytes, staff_id: str, issued_at: datetime) -> str:
    """`<staff_id>.<issued unix seconds>.<HMAC-SHA256, base64url, 16 bytes>`."""
    body = f"{staff_id}.{int(issued_at.timestamp())}"
    mac = hmac.new(secret, body.encode(), hashlib.sha256).digest()[:16]
    return f"{body}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"


@dataclass(frozen=True)
class GuideRef:
    staff_id: str
    issued_at: datetime


def verify_guide_ref(secret: bytes, value: str, tz: ZoneInfo) -> GuideRef | None:
    """The guide a link names, or None when it is malformed or forged."""
    parts = value.rsplit(".", 2)
    if len(parts) != 3:
        return None
    staff_id, issued, _mac = parts
    try:
        issued_at = datetime.fromtimestamp(int(issued), tz)
    except (ValueError, OverflowError, OSError):
        return None
    expected = sign_guide_ref(secret, staff_id, issued_at)
    if not hmac.compare_digest(expected, value):
        return None
    return GuideRef(staff_id, issued_at)


# ---------------------------------------------------------------- attribution


class AttributionRule(enum.StrEnum):
    GUIDE_LINK = "guide_link"
    STAFF_CODE = "staff_code"
    BINDING = "binding"


def parse_rules(value: str) -> tuple[AttributionRule, ...]:
    """The configured precedence, e.g. "guide_link,staff_code,binding"."""
    rules = []
    for part in value.split(","):
        part = part.strip()
        if part:
            try:
                rules.append(AttributionRule(part))
            except ValueError:
                raise ValueError(
                    f"unknown attribution rule {part!r}: use "
                    + ", ".join(r.value for r in AttributionRule)
                ) from None
    if len(set(rules)) != len(rules):
        raise ValueError("an attribution rule is listed twice")
    return tuple(rules)


@dataclass(frozen=True)
class Candidate:
    """A guide an order could be attributed to by one rule, and since when."""

    rule: AttributionRule
    staff_id: str
    store_id: str
    since: datetime


def attribute(
    candidates: Sequence[Candidate],
    rules: Sequence[AttributionRule],
    ordered_at: datetime,
    window: timedelta,
) -> Candidate | None:
    """The first rule (in configured order) whose guide is within the window:
    a link within `window` of its issue, a binding within `window` of its start
    (a zero window: no limit). The till's staff code is the sale itself."""
    by_rule = {c.rule: c for c in candidates}
    for rule in rules:
        c = by_rule.get(rule)
        if c is None:
            continue
        if rule is AttributionRule.STAFF_CODE or window <= timedelta(0):
            return c
        if c.since <= ordered_at + timedelta(minutes=5) and ordered_at - c.since <= window:
            return c
    return None


def local_day(at: datetime, tz: ZoneInfo) -> str:
    return at.astimezone(tz).date().isoformat()


# ---------------------------------------------------------------- rule tags


@dataclass(frozen=True)
class OrderFact:
    order_id: str
    store_id: str
    channel: str
    paid_amount_fen: int
    ordered_at: datetime
    categories: tuple[tuple[str, int], ...]  # (category, quantity)


@dataclass(frozen=True)
class TagRules:
    """Thresholds of the rule tags (configuration, docs/guides.md)."""

    min_orders: int = 2
    price_low_below_fen: int = 1500
    price_high_from_fen: int = 3000
    # Share of orders (percent) a habit, store or channel needs to become a tag.
    majority_percent: int = 50
    morning_until: time = time(11, 0)
    evening_from: time = time(17, 0)


RULE_TAG_PREFIXES = ("category:", "price:", "habit:", "store:", "channel:")


def rule_tags(orders: Iterable[OrderFact], tz: ZoneInfo, rules: TagRules) -> frozenset[str]:
    """The rule tags a member's recent orders earn: preferred category (most
    cups), price band (mean paid per order), time-of-day habit, favourite store
    and channel preference (each when a majority of orders agree). Fewer than
    `min_orders` orders earn no tags: one visit is not a habit."""
    facts = list(orders)
    if len(facts) < rules.min_orders:
        return frozenset()
    tags: set[str] = set()
    cups: Counter[str] = Counter()
    for o in facts:
        for category, quantity in o.categories:
            if category:
                cups[category] += max(quantity, 0)
    if cups:
        # Ties broken by name, so the batch and the incremental path agree.
        best = sorted(cups.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        tags.add(f"category:{best}")
    mean = sum(o.paid_amount_fen for o in facts) // len(facts)
    if mean < rules.price_low_below_fen:
        tags.add("price:low")
    elif mean >= rules.price_high_from_fen:
        tags.add("price:high")
    else:
        tags.add("price:mid")

    def majority(values: list[str]) -> str | None:
        top = sorted(Counter(values).items(), key=lambda kv: (-kv[1], kv[0]))[0]
        return top[0] if top[1] * 100 > len(values) * rules.majority_percent else None

    def habit(at: datetime) -> str:
        t = at.astimezone(tz).time()
        if t < rules.morning_until:
            return "morning"
        return "evening" if t >= rules.evening_from else "afternoon"

    for prefix, values in (
        ("habit:", [habit(o.ordered_at) for o in facts]),
        ("store:", [o.store_id for o in facts if o.store_id]),
        ("channel:", [o.channel for o in facts if o.channel]),
    ):
        if values and (winner := majority(values)) is not None:
            tags.add(f"{prefix}{winner}")
    return frozenset(tags)


def is_rule_tag(tag: str) -> bool:
    return tag.startswith(RULE_TAG_PREFIXES)


# ---------------------------------------------------------------- workstation sessions


def sign_session(secret: bytes, staff_id: str, expires_at: datetime) -> str:
    """`ws1.<staff_id>.<expiry unix seconds>.<HMAC-SHA256, base64url>`."""
    body = f"ws1.{staff_id}.{int(expires_at.timestamp())}"
    mac = hmac.new(secret, body.encode(), hashlib.sha256).digest()
    return f"{body}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"


def verify_session(secret: bytes, token: str, now: datetime) -> str:
    """The staff id of a valid, unexpired session token."""
    parts = token.split(".")
    if len(parts) < 4 or parts[0] != "ws1":
        raise PermissionDenied("not a workstation session", code="INVALID_SESSION", field="token")
    staff_id, expiry = ".".join(parts[1:-2]), parts[-2]
    try:
        expires = int(expiry)
    except ValueError:
        raise PermissionDenied(
            "not a workstation session", code="INVALID_SESSION", field="token"
        ) from None
    expected = sign_session(secret, staff_id, datetime.fromtimestamp(expires, now.tzinfo))
    if not hmac.compare_digest(expected, token):
        raise PermissionDenied("not a workstation session", code="INVALID_SESSION", field="token")
    if now.timestamp() >= expires:
        raise PermissionDenied(
            "the workstation session expired", code="SESSION_EXPIRED", field="token"
        )
    return staff_id


def budget_month(at: datetime, tz: ZoneInfo) -> str:
    return at.astimezone(tz).strftime("%Y-%m")


# ---------------------------------------------------------------- communities

# In the order a member is placed: the most valuable group they fit first.
AUDIENCES = ("vip", "growth", "general")


def fits_audience(tiers: list[str], tier: str) -> bool:
    """A group's tiers (empty: everyone) include the member's tier."""
    return not tiers or tier in tiers
