"""Pure identity rules: identifier types, normalisation, masking. No I/O."""

from __future__ import annotations

import enum
import functools
import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers

from servicekit.errors import InvalidArgument

if TYPE_CHECKING:
    from .policy import IdentityPolicy

# Values clients send when they have nothing; never an identifier.
PLACEHOLDER_VALUES = frozenset({"", "null", "none", "undefined", "nil", "nan", "0", "-"})
MAX_VALUE_LENGTH = 128
DEFAULT_PHONE_REGION = "CN"


class IdType(enum.StrEnum):
    PHONE = "phone"
    WECHAT_UNIONID = "wechat_unionid"
    WECHAT_OPENID = "wechat_openid"
    WECOM_EXTERNAL_USERID = "wecom_external_userid"
    POS_CARD = "pos_card"
    DELIVERY_PLATFORM_ID = "delivery_platform_id"
    MEMBER_NUMBER = "member_number"


# Ids that are only meaningful inside an app or platform need that namespace.
NAMESPACED = frozenset({IdType.WECHAT_OPENID, IdType.DELIVERY_PLATFORM_ID})


@dataclass(frozen=True)
class ObservedIdentifier:
    """An identifier as normalised for storage and lookup."""

    id_type: IdType
    value: str
    namespace: str
    verified: bool

    @property
    def key(self) -> str:
        """Stable text naming this identifier (hashed for lookup and locking)."""
        return f"{self.id_type}|{self.namespace}|{self.value}"


class _NotValid(Exception):
    pass


# Parsing is most of a POS identify's own CPU in member (the same phones come
# back to the tills): valid numbers' E.164 forms are kept, bounded; a refused
# value is parsed again each time (lru_cache keeps no exceptions).
PHONE_CACHE_SIZE = 4096


@functools.lru_cache(maxsize=PHONE_CACHE_SIZE)
def _e164(text: str, region: str) -> str:
    parsed = phonenumbers.parse(text, region)
    if not phonenumbers.is_valid_number(parsed):
        raise _NotValid
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def normalise_phone(raw: str, field: str, region: str = DEFAULT_PHONE_REGION) -> str:
    """Phone to E.164; mainland China is the default region."""
    try:
        return _e164(raw.strip(), region)
    except phonenumbers.NumberParseException as exc:
        raise InvalidArgument(
            f"{field} is not a phone number: {exc}", code="INVALID_PHONE", field=field
        ) from None
    except _NotValid:
        raise InvalidArgument(
            f"{field} is not a valid phone number", code="INVALID_PHONE", field=field
        ) from None


def mask(id_type: IdType, value: str) -> str:
    """What may be shown: 139****5678 for a mainland mobile, ends kept otherwise."""
    if id_type is IdType.PHONE:
        national = value[3:] if value.startswith("+86") else value
        if len(national) >= 7:
            return f"{national[:3]}****{national[-4:]}"
    if len(value) <= 4:
        return "*" * len(value)
    return f"{value[:2]}{'*' * (len(value) - 4)}{value[-2:]}"


def normalise(
    id_type: IdType, raw: str, namespace: str, verified: bool, field: str
) -> ObservedIdentifier:
    value = raw.strip()
    if value.lower() in PLACEHOLDER_VALUES:
        raise InvalidArgument(f"{field} is empty", code="EMPTY_IDENTIFIER", field=field)
    if len(value) > MAX_VALUE_LENGTH:
        raise InvalidArgument(
            f"{field} is longer than {MAX_VALUE_LENGTH} characters",
            code="IDENTIFIER_TOO_LONG",
            field=field,
        )
    if id_type is IdType.PHONE:
        value = normalise_phone(value, field)
    ns = namespace.strip()
    if id_type in NAMESPACED and not ns:
        raise InvalidArgument(
            f"{field}: a {id_type} needs the app or platform it belongs to in namespace",
            code="NAMESPACE_REQUIRED",
            field=field,
        )
    if id_type not in NAMESPACED:
        ns = ""
    return ObservedIdentifier(id_type, value, ns, verified)


def dedupe(observed: list[ObservedIdentifier]) -> list[ObservedIdentifier]:
    """One entry per identifier; verified wins when the same value came twice."""
    by_key: dict[str, ObservedIdentifier] = {}
    for ident in observed:
        seen = by_key.get(ident.key)
        if seen is None or (ident.verified and not seen.verified):
            by_key[ident.key] = ident
    return sorted(by_key.values(), key=lambda i: i.key)


# ---- OneID: limits and survivorship ---------------------------------------


@dataclass(frozen=True)
class Holding:
    """An identity a member holds, as far as per-type limits care."""

    id_type: IdType
    namespace: str
    verified: bool


def _limit_counts(holdings: list[Holding], per_namespace: bool) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for h in holdings:
        scope = h.namespace if per_namespace else ""
        counts[(h.id_type.value, scope)] = counts.get((h.id_type.value, scope), 0) + 1
        if h.verified:
            key = (f"{h.id_type.value}_verified", scope)
            counts[key] = counts.get(key, 0) + 1
    return counts


def limit_violations(policy: IdentityPolicy, members: list[list[Holding]]) -> list[str]:
    """Limits that uniting these members' identities would break, e.g.
    ["phone_verified", "wechat_unionid"]; empty when the union is allowed.

    A limit an operator already overrode on one member (it holds more than
    the limit) is not broken again by a union that adds nothing to it.
    """
    broken: set[str] = set()
    for id_type, spec in policy.types.items():
        limits = {id_type.value: spec.max_per_member}
        limits[f"{id_type.value}_verified"] = spec.max_verified_per_member
        per_member = [
            _limit_counts([h for h in held if h.id_type is id_type], spec.per_namespace)
            for held in members
        ]
        union: dict[tuple[str, str], int] = {}
        for counts in per_member:
            for key, n in counts.items():
                union[key] = union.get(key, 0) + n
        for (name, scope), n in union.items():
            limit = limits.get(name)
            if limit is None or n <= limit:
                continue
            if n > max(c.get((name, scope), 0) for c in per_member):
                broken.add(name)
    return sorted(broken)


def choose_survivor(members: list[tuple[datetime, str]]) -> str:
    """The oldest member survives (ties by id): deterministic whatever the order."""
    return min(members)[1]


# ---- profile and consent survivorship --------------------------------------


PROFILE_FIELDS = (
    "nickname",
    "birthday",
    "gender",
    "registration_store_id",
    "acquisition_channel",
    "acquisition_campaign",
    "time_zone",
)
MAX_PROFILE_VALUE = 64


@dataclass(frozen=True)
class Observation:
    member_id: str
    field: str
    value: str
    source: str
    verified: bool
    observed_at: datetime


def is_time_zone(name: str) -> bool:
    """An IANA zone name the standard library knows (e.g. "Europe/London")."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return "/" in name or name == "UTC"


def effective_profile(observations: list[Observation]) -> dict[str, str]:
    """Per field: the most recent verified value, else the most recent value."""
    out: dict[str, str] = {}
    for name in PROFILE_FIELDS:
        seen = [o for o in observations if o.field == name]
        if not seen:
            continue
        verified = [o for o in seen if o.verified]
        pick = max(verified or seen, key=lambda o: o.observed_at)
        out[name] = pick.value
    return out


class ConsentPurpose(enum.StrEnum):
    MARKETING = "marketing"
    PERSONALISATION = "personalisation"


class ConsentChannel(enum.StrEnum):
    WECOM = "wecom"
    SMS = "sms"
    MINI_PROGRAM = "mini_program"
    APP_PUSH = "app_push"
    ALL = "all"


MARKETING_CHANNELS = (
    ConsentChannel.WECOM,
    ConsentChannel.SMS,
    ConsentChannel.MINI_PROGRAM,
    ConsentChannel.APP_PUSH,
)
CONSENT_KEYS: tuple[tuple[ConsentPurpose, ConsentChannel], ...] = (
    *((ConsentPurpose.MARKETING, c) for c in MARKETING_CHANNELS),
    (ConsentPurpose.PERSONALISATION, ConsentChannel.ALL),
)


def check_consent_key(purpose: ConsentPurpose, channel: ConsentChannel) -> None:
    if (purpose, channel) not in CONSENT_KEYS:
        raise InvalidArgument(
            f"{purpose} consent is not given per {channel}",
            code="INVALID_CONSENT_CHANNEL",
            field="channel",
        )


@dataclass(frozen=True)
class ConsentRecord:
    member_id: str
    purpose: ConsentPurpose
    channel: ConsentChannel
    granted: bool
    source: str
    actor: str
    recorded_at: datetime


def event_channel(channel: ConsentChannel) -> str:
    """The channel as ConsentChanged names it: the same words, "" for all channels."""
    return "" if channel is ConsentChannel.ALL else channel.value


ConsentState = dict[tuple[ConsentPurpose, ConsentChannel], ConsentRecord]


def consent_changes(
    before: ConsentState, after: ConsentState
) -> list[tuple[ConsentPurpose, ConsentChannel, bool]]:
    """Keys whose effective answer changed (a merge or an unmerge recomputes
    them). No record means no consent (opt-in), so a key that loses its last
    record becomes a refusal."""
    out: list[tuple[ConsentPurpose, ConsentChannel, bool]] = []
    for key in CONSENT_KEYS:
        was, now = before.get(key), after.get(key)
        if (was is not None and was.granted) != (now is not None and now.granted) or (
            was is None and now is not None
        ):
            out.append((key[0], key[1], now is not None and now.granted))
    return out


def effective_consent(
    records: list[ConsentRecord], root_id: str, last_merge_at: datetime | None
) -> dict[tuple[ConsentPurpose, ConsentChannel], ConsentRecord]:
    """Per purpose and channel, over a merged cluster: the latest explicit
    choice made on the merged member after its last merge wins; otherwise the
    most restrictive of each member's own latest choice. No record: no consent."""
    out: dict[tuple[ConsentPurpose, ConsentChannel], ConsentRecord] = {}
    for key in CONSENT_KEYS:
        mine = [r for r in records if (r.purpose, r.channel) == key]
        if not mine:
            continue
        after_merge = [
            r
            for r in mine
            if r.member_id == root_id and (last_merge_at is None or r.recorded_at > last_merge_at)
        ]
        if after_merge:
            out[key] = max(after_merge, key=lambda r: r.recorded_at)
            continue
        latest_each: dict[str, ConsentRecord] = {}
        for r in mine:
            seen = latest_each.get(r.member_id)
            if seen is None or r.recorded_at > seen.recorded_at:
                latest_each[r.member_id] = r
        refused = [r for r in latest_each.values() if not r.granted]
        out[key] = max(refused or latest_each.values(), key=lambda r: r.recorded_at)
    return out


# ---- dynamic member code ---------------------------------------------------

# Every issue is a fresh code (a random part), redeemable once within its
# lifetime; the mini-program asks for another after CODE_REFRESH_SECONDS, or
# right after a scan.
CODE_LIFETIME_SECONDS = 60
CODE_REFRESH_SECONDS = 30
CODE_PREFIX = "8"
CODE_LENGTH = 20
_NONCE_DIGITS = 11
_MAC_DIGITS = 8


def _code_mac(secret: bytes, nonce: str) -> str:
    digest = hmac.new(secret, f"member-code|{nonce}".encode(), hashlib.sha256)
    return f"{int.from_bytes(digest.digest()[:8], 'big') % 10**_MAC_DIGITS:0{_MAC_DIGITS}d}"


def member_code(secret: bytes, nonce: int) -> str:
    """20 digits: prefix, 11 random digits, 8 digits of HMAC over them. The
    HMAC lets a forgery be refused before any lookup; the random part is the
    key of the issued code (member.member_codes, by keyed hash)."""
    digits = f"{nonce % 10**_NONCE_DIGITS:0{_NONCE_DIGITS}d}"
    return f"{CODE_PREFIX}{digits}{_code_mac(secret, digits)}"


def parse_member_code(code: str) -> tuple[str, str]:
    """(random part, mac) of a well-formed code."""
    text = code.strip()
    if len(text) != CODE_LENGTH or not text.isdigit() or not text.startswith(CODE_PREFIX):
        raise InvalidArgument(
            f"code must be {CODE_LENGTH} digits starting with {CODE_PREFIX}",
            code="MALFORMED_MEMBER_CODE",
            field="code",
        )
    return text[1 : 1 + _NONCE_DIGITS], text[1 + _NONCE_DIGITS :]


def member_code_is_genuine(secret: bytes, code: str) -> bool:
    """This brand made the code (its HMAC matches); MALFORMED_MEMBER_CODE if not 20 digits."""
    nonce, mac = parse_member_code(code)
    return hmac.compare_digest(_code_mac(secret, nonce), mac)
