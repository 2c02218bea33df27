"""Message templates of send steps: the provider content a step declares, with
`{variable}` placeholders, checked against each provider's field rules when the
journey is published and rendered from the member's facts and the entering
event when the send is written.

A placeholder is `{name}` or `{name:N}` (cut to N characters when rendered).
Every variable has a kind and a widest rendered value, so the publish check can
prove a field can never exceed its provider limit (WeChat `thing` <= 20
characters, SMS variables <= 35, ...): a bad template is refused at publish
time with the field named, not discovered by the provider at 3 a.m.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

# ---- variables -------------------------------------------------------------------


@dataclass(frozen=True)
class Variable:
    # "text" | "number" | "date" | "id"
    kind: str
    # The widest rendered value, in characters.
    width: int
    # Where it is read: ("event", attribute) | ("member", fact) | ("clock", "date").
    source: tuple[str, str]


# What a template can say. Event attributes are those the entering event carries
# (services/engagement/server.py maps each bus event to them); member facts are
# what engagement keeps of the member (member_facts, fed by events).
VARIABLES: dict[str, Variable] = {
    "nickname": Variable("text", 32, ("member", "nickname")),
    "points": Variable("number", 10, ("event", "points")),
    "points_balance": Variable("number", 10, ("event", "points_balance")),
    # An instant (UTC) rendered as the date in the member's zone.
    "points_expire_on": Variable("date", 10, ("event", "expires_at")),
    "coupon_name": Variable("text", 64, ("event", "name")),
    "coupon_expire_on": Variable("date", 10, ("event", "expires_at")),
    "store_name": Variable("text", 32, ("event", "store_name")),
    "store_id": Variable("id", 32, ("event", "store_id")),
    "coupon_id": Variable("id", 36, ("event", "coupon_id")),
    "tier": Variable("text", 16, ("member", "tier")),
    "member_id": Variable("id", 36, ("member", "member_id")),
    "today": Variable("date", 10, ("clock", "date")),
}

# Which variables each entry event can fill: its attributes as server.py maps
# the bus event (or as the gateway / an operator launch supplies them). The
# member's facts and the clock (`MEMBER_VARIABLES`) serve every trigger. A
# journey whose send step names a variable its trigger can never supply is
# refused at publish (UNSUPPLIED_VARIABLE); one the member merely lacks today
# (no nickname set) fails that send when written (MISSING_VARIABLE).
MEMBER_VARIABLES = frozenset({"nickname", "tier", "member_id", "today"})
_STORE = frozenset({"store_id", "store_name"})
TRIGGER_VARIABLES: dict[str, frozenset[str]] = {
    "member_registered": frozenset(),
    # rewards' OrderCompleted: the store, its name from rewards' stores
    # (EngagementHandlers.with_store_name).
    "order_completed": _STORE,
    "first_order": _STORE,
    "tier_changed": frozenset(),
    "segment_changed": frozenset(),
    "lifecycle_stage_changed": frozenset(),
    "cart_abandoned": frozenset(),
    "page_view": frozenset(),
    # The mini-program's check-in names the store it was made at (its name
    # added by EngagementHandlers.with_store_name, like every store event's).
    "check_in": _STORE,
    "subscription_tap": frozenset(),
    # rewards' PointsExpiringSoon: points lapsing, when, and the balance then.
    "points_expiring_soon": frozenset({"points", "points_expire_on", "points_balance"}),
    # rewards' CouponExpiringSoon.
    "coupon_expiring_soon": frozenset({"coupon_id", "coupon_name", "coupon_expire_on"}),
    "birthday_month": frozenset(),
    "location_reported": frozenset(),
    # An operator launch at a store.
    "near_store": _STORE,
    # guides' community events name the group's store.
    "community_joined": _STORE,
    "community_left": _STORE,
}


def supplied(trigger: str) -> frozenset[str]:
    """The variables a journey entered by `trigger` can fill."""
    return TRIGGER_VARIABLES.get(trigger, frozenset()) | MEMBER_VARIABLES


_PLACEHOLDER = re.compile(r"\{([a-z_]+)(?::(\d{1,3}))?\}")


@dataclass(frozen=True)
class Part:
    literal: str = ""
    variable: str = ""
    cut: int = 0  # 0 = not cut

    def width(self) -> int:
        if not self.variable:
            return len(self.literal)
        w = VARIABLES[self.variable].width
        return min(w, self.cut) if self.cut else w


def parse_text(text: str) -> tuple[list[Part], list[str]]:
    """The parts of a template string, and the unknown variables it names."""
    parts: list[Part] = []
    unknown: list[str] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(text):
        if m.start() > pos:
            parts.append(Part(literal=text[pos : m.start()]))
        name = m.group(1)
        if name not in VARIABLES:
            unknown.append(name)
        parts.append(Part(variable=name, cut=int(m.group(2) or 0)))
        pos = m.end()
    if pos < len(text):
        parts.append(Part(literal=text[pos:]))
    return parts, unknown


# ---- provider field rules ----------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One provider field type: the longest value and what it may contain."""

    max_len: int
    # The variable kinds allowed in it (None = any).
    kinds: frozenset[str] | None = None
    # A literal value must match this (None = any text).
    literal: re.Pattern[str] | None = None
    # Exactly one variable and no literal text (dates, times).
    single: bool = False


_DIGITS = re.compile(r"^[0-9.]*$")
_DATE = re.compile(r"^(\d{4}-\d{2}-\d{2}|\d{4}年\d{1,2}月\d{1,2}日)( \d{2}:\d{2}(:\d{2})?)?$")

# WeChat subscribe-message keyword types (the key's prefix, e.g. `thing1`), as the
# mini-program admin console documents them.
WECHAT_KEYWORDS: dict[str, Rule] = {
    "thing": Rule(20),
    "number": Rule(32, frozenset({"number"}), _DIGITS),
    "letter": Rule(32, frozenset(), re.compile(r"^[A-Za-z]*$")),
    "symbol": Rule(5, frozenset(), re.compile(r"^[^\w\s]*$")),
    "character_string": Rule(32, frozenset({"number", "id"}), re.compile(r"^[\x21-\x7e]*$")),
    "time": Rule(19, frozenset({"date"}), _DATE, single=True),
    "date": Rule(19, frozenset({"date"}), _DATE, single=True),
    "amount": Rule(13, frozenset({"number"}), re.compile(r"^[¥$￥]?[0-9.]*元?$")),
    "phone_number": Rule(17, frozenset({"number"}), re.compile(r"^[0-9+\-]*$")),
    "car_number": Rule(8, frozenset()),
    "name": Rule(10, frozenset({"text"})),
    "phrase": Rule(5, frozenset()),
}
_WECHAT_KEY = re.compile(r"^([a-z_]+?)(\d+)$")
# Aliyun SMS: every template variable's value is at most 35 characters.
SMS_VARIABLE = Rule(35)
# WeCom text content: 4000 bytes; a mini-program card title: 64 bytes.
WECOM_TEXT_BYTES = 4000
WECOM_TITLE_BYTES = 64
# The generic app push contract (docs/journeys.md): title 64, body 256 characters.
PUSH_TITLE = Rule(64)
PUSH_BODY = Rule(256)
PAGE = Rule(512, frozenset({"number", "id"}))


def check_value(path: str, value: object, rule: Rule, errors: Any, bytes_: bool = False) -> None:
    """Refuse a template value that can break the rule for some member."""
    if not isinstance(value, str):
        errors.add(path, "INVALID_TEMPLATE_VALUE", "a template value is a string")
        return
    parts, unknown = parse_text(value)
    for name in unknown:
        errors.add(path, "UNKNOWN_TEMPLATE_VARIABLE", f"unknown variable {{{name}}}")
    if unknown:
        return
    variables = [p for p in parts if p.variable]
    literal = "".join(p.literal for p in parts)
    if rule.kinds is not None:
        for p in variables:
            kind = VARIABLES[p.variable].kind
            if kind not in rule.kinds:
                errors.add(path, "TEMPLATE_FIELD_TYPE", f"{{{p.variable}}} ({kind}) cannot fill it")
                return
    if rule.single and variables and (len(variables) != 1 or literal.strip()):
        errors.add(path, "TEMPLATE_FIELD_TYPE", "one date variable and nothing else")
        return
    if rule.literal is not None and not variables and not rule.literal.match(literal):
        errors.add(path, "TEMPLATE_FIELD_TYPE", f"{literal!r} is not a valid value here")
        return
    if rule.literal is not None and variables and not rule.single:
        # Literal text around numbers must itself fit the type (e.g. "¥" in amount).
        if not rule.literal.match(literal):
            errors.add(path, "TEMPLATE_FIELD_TYPE", f"{literal!r} cannot appear here")
            return
    width = sum(p.width() for p in parts)
    if bytes_:
        # Variables may be Chinese: three UTF-8 bytes a character.
        width = len(literal.encode()) + 3 * sum(p.width() for p in variables)
    if width > rule.max_len:
        unit = "bytes" if bytes_ else "characters"
        errors.add(
            path,
            "TEMPLATE_VALUE_TOO_LONG",
            f"can reach {width} {unit}, the provider allows {rule.max_len}"
            " (shorten it, or cut a variable with {name:N})",
        )


def check_content(channel: str, raw: dict[str, Any], path: str, errors: Any) -> dict[str, Any]:
    """The step's content for its channel, each field checked by the provider's
    rules; returns what rendering needs (the fields as written)."""
    content: dict[str, Any] = {}
    if channel == "miniprogram":
        data = raw.get("data")
        if not isinstance(data, dict) or not data:
            errors.add(f"{path}.data", "MISSING_TEMPLATE_DATA", "data: keyword -> value")
            return content
        for key, value in data.items():
            m = _WECHAT_KEY.match(str(key))
            rule = WECHAT_KEYWORDS.get(m.group(1)) if m else None
            if rule is None:
                errors.add(
                    f"{path}.data.{key}",
                    "UNKNOWN_KEYWORD_TYPE",
                    f"{key!r}: a WeChat keyword like thing1, number2, date3, amount4",
                )
                continue
            check_value(f"{path}.data.{key}", value, rule, errors)
        content["data"] = {str(k): v for k, v in data.items()}
        page = raw.get("page", "")
        check_value(f"{path}.page", page, PAGE, errors)
        content["page"] = page
    elif channel == "sms":
        params = raw.get("params", {})
        if not isinstance(params, dict):
            errors.add(f"{path}.params", "INVALID_TEMPLATE_VALUE", "params: name -> value")
            return content
        for key, value in params.items():
            check_value(f"{path}.params.{key}", value, SMS_VARIABLE, errors)
        content["params"] = {str(k): v for k, v in params.items()}
        sign = raw.get("sign_name", "")
        if not isinstance(sign, str) or len(sign) > 12:
            errors.add(f"{path}.sign_name", "INVALID_SIGN_NAME", "sign_name: up to 12 characters")
        content["sign_name"] = sign
    elif channel == "wecom":
        text = raw.get("text")
        card = raw.get("miniprogram")
        if text is None and card is None:
            errors.add(f"{path}.text", "MISSING_TEMPLATE_DATA", "text or miniprogram is required")
            return content
        if text is not None:
            check_value(f"{path}.text", text, Rule(WECOM_TEXT_BYTES), errors, bytes_=True)
            content["text"] = text
        if card is not None:
            if not isinstance(card, dict):
                errors.add(f"{path}.miniprogram", "INVALID_TEMPLATE_VALUE", "an object")
                return content
            for key in ("title", "appid", "page", "pic_media_id"):
                if not isinstance(card.get(key), str) or not card.get(key):
                    errors.add(f"{path}.miniprogram.{key}", "MISSING_TEMPLATE_DATA", "required")
            check_value(
                f"{path}.miniprogram.title",
                card.get("title", ""),
                Rule(WECOM_TITLE_BYTES),
                errors,
                bytes_=True,
            )
            check_value(f"{path}.miniprogram.page", card.get("page", ""), PAGE, errors)
            content["miniprogram"] = dict(card)
    elif channel == "app_push":
        body = raw.get("body")
        if body is None:
            errors.add(f"{path}.body", "MISSING_TEMPLATE_DATA", "body is required")
            return content
        check_value(f"{path}.body", body, PUSH_BODY, errors)
        title = raw.get("title", "")
        check_value(f"{path}.title", title, PUSH_TITLE, errors)
        page = raw.get("page", "")
        check_value(f"{path}.page", page, PAGE, errors)
        content.update(title=title, body=body, page=page)
    return content


def _texts(value: Any, path: str) -> list[tuple[str, str]]:
    """(path, text) of every template string in a step's checked content."""
    if isinstance(value, str):
        return [(path, value)]
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in _texts(v, f"{path}.{k}")]
    return []


def check_supplied(trigger: str, content: dict[str, Any], path: str, errors: Any) -> None:
    """Refuse a variable the journey's entry event and the member's facts can
    never supply (it would fail MISSING_VARIABLE for every member)."""
    can = supplied(trigger)
    for where, text in _texts(content, path):
        parts, _ = parse_text(text)
        for p in parts:
            if p.variable and p.variable in VARIABLES and p.variable not in can:
                errors.add(
                    where,
                    "UNSUPPLIED_VARIABLE",
                    f"{{{p.variable}}} is never supplied to a journey entered by {trigger}"
                    f" (it supplies: {', '.join(sorted(can))})",
                )


# ---- rendering ---------------------------------------------------------------------


class RenderError(Exception):
    """A send whose template cannot be filled for this member (e.g. the event
    carried no such attribute): recorded as failed, nothing is sent."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


def _value(name: str, event: dict[str, str], member: dict[str, str], now: datetime) -> str:
    var = VARIABLES[name]
    where, key = var.source
    if where == "event":
        found = event.get(key)
    elif where == "member":
        found = member.get(key)
    else:
        found = now.date().isoformat()
    if found is None or found == "":
        raise RenderError("MISSING_VARIABLE", f"{{{name}}} has no value for this member")
    text = str(found)
    if var.kind == "date" and "T" in text:
        text = _local_date(text, member.get("tz", ""))
    return text


def _local_date(instant: str, tz: str) -> str:
    """An RFC 3339 instant as the date in the member's zone (the brand's
    default zone when the member has none); a value without an offset is
    taken as already local."""
    try:
        at = datetime.fromisoformat(instant.replace("Z", "+00:00"))
    except ValueError:
        return instant.split("T", 1)[0]
    if at.tzinfo is None:
        return at.date().isoformat()
    from .domain import DEFAULT_TZ  # domain imports journey, which imports this

    try:
        zone = ZoneInfo(tz or DEFAULT_TZ)
    except (ZoneInfoNotFoundError, ValueError):
        zone = ZoneInfo(DEFAULT_TZ)
    return at.astimezone(zone).date().isoformat()


def render_text(
    text: str, event: dict[str, str], member: dict[str, str], now: datetime, limit: int = 0
) -> str:
    parts, unknown = parse_text(text)
    if unknown:
        raise RenderError("UNKNOWN_VARIABLE", f"unknown variable {unknown[0]}")
    out: list[str] = []
    for p in parts:
        if not p.variable:
            out.append(p.literal)
            continue
        value = _value(p.variable, event, member, now)
        if p.cut and len(value) > p.cut:
            value = value[: p.cut]
        elif len(value) > VARIABLES[p.variable].width:
            raise RenderError("VARIABLE_TOO_LONG", f"{{{p.variable}}} is {len(value)} characters")
        out.append(value)
    rendered = "".join(out)
    if limit and len(rendered) > limit:
        raise RenderError("VALUE_TOO_LONG", f"{len(rendered)} characters, at most {limit}")
    return rendered


def render(
    channel: str,
    template: str,
    content: dict[str, Any],
    event: dict[str, str],
    member: dict[str, str],
    now: datetime,
) -> dict[str, Any]:
    """The provider payload of one send (what channels.py puts in the request)."""

    def r(text: str, limit: int = 0) -> str:
        return render_text(text, event, member, now, limit)

    if channel == "miniprogram":
        data: dict[str, dict[str, str]] = {}
        for key, value in content.get("data", {}).items():
            m = _WECHAT_KEY.match(key)
            limit = WECHAT_KEYWORDS[m.group(1)].max_len if m else 0
            data[key] = {"value": r(value, limit)}
        return {"template_id": template, "page": r(content.get("page", "")), "data": data}
    if channel == "sms":
        params = {k: r(v, SMS_VARIABLE.max_len) for k, v in content.get("params", {}).items()}
        return {
            "template_code": template,
            "sign_name": content.get("sign_name", ""),
            "params": params,
        }
    if channel == "wecom":
        out: dict[str, Any] = {}
        if "text" in content:
            out["text"] = r(content["text"])
        card = content.get("miniprogram")
        if card:
            out["miniprogram"] = {**card, "title": r(card["title"]), "page": r(card["page"])}
        return out
    if channel == "app_push":
        return {
            "title": r(content.get("title", "")),
            "body": r(content.get("body", "")),
            "page": r(content.get("page", "")),
        }
    return {}
