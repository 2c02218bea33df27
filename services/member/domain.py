"""Pure identity rules: identifier types, normalisation, masking. No I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import phonenumbers

from servicekit.errors import InvalidArgument

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


def normalise_phone(raw: str, field: str, region: str = DEFAULT_PHONE_REGION) -> str:
    """Phone to E.164; mainland China is the default region."""
    text = raw.strip()
    try:
        parsed = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException as exc:
        raise InvalidArgument(
            f"{field} is not a phone number: {exc}", code="INVALID_PHONE", field=field
        ) from None
    if not phonenumbers.is_valid_number(parsed):
        raise InvalidArgument(
            f"{field} is not a valid phone number", code="INVALID_PHONE", field=field
        )
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


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
