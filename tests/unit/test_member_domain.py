"""Identity rules without I/O."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from servicekit.errors import InvalidArgument
from services.member.domain import (
    ConsentChannel,
    ConsentPurpose,
    ConsentRecord,
    IdType,
    ObservedIdentifier,
    consent_changes,
    dedupe,
    event_channel,
    mask,
    normalise,
)
from services.member.pii import PiiVault

FIELD = "identifiers[0].value"


@pytest.mark.parametrize(
    "raw",
    ["13912345678", "139 1234 5678", "+86 139-1234-5678", "+8613912345678", " 13912345678 "],
)
def test_mainland_mobiles_normalise_to_e164(raw: str) -> None:
    assert normalise(IdType.PHONE, raw, "", False, FIELD).value == "+8613912345678"


@pytest.mark.parametrize("raw", ["12345", "abc", "1391234567", "139123456789", "+1 999"])
def test_malformed_phones_are_refused_with_the_field(raw: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        normalise(IdType.PHONE, raw, "", False, FIELD)
    assert caught.value.code == "INVALID_PHONE"
    assert caught.value.field == FIELD


def test_repeated_phones_answer_the_same_and_refusals_name_each_calls_field() -> None:
    """Parsed phones are kept (domain.PHONE_CACHE_SIZE): the answer is the
    same however often a phone comes back, and a refused one is refused every
    time, with the field of that call."""
    for _ in range(3):
        assert normalise(IdType.PHONE, "139 1234 5678", "", False, FIELD).value == "+8613912345678"
    for field in ("phone", "identifier.value", FIELD):
        for raw in ("1391234567", "abc"):
            with pytest.raises(InvalidArgument) as caught:
                normalise(IdType.PHONE, raw, "", False, field)
            assert (caught.value.code, caught.value.field) == ("INVALID_PHONE", field)


@pytest.mark.parametrize("raw", ["", "  ", "null", "NULL", "undefined", "None", "0", "-"])
def test_placeholders_are_never_identifiers(raw: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        normalise(IdType.WECHAT_UNIONID, raw, "", True, FIELD)
    assert caught.value.code == "EMPTY_IDENTIFIER"


def test_openid_needs_its_app() -> None:
    with pytest.raises(InvalidArgument) as caught:
        normalise(IdType.WECHAT_OPENID, "oAbc123", "", False, FIELD)
    assert caught.value.code == "NAMESPACE_REQUIRED"
    assert normalise(IdType.WECHAT_OPENID, "oAbc123", "wx-app", False, FIELD).namespace == "wx-app"


def test_global_ids_drop_a_namespace() -> None:
    assert normalise(IdType.WECHAT_UNIONID, "u1", "ignored", True, FIELD).namespace == ""


def test_overlong_values_are_refused() -> None:
    with pytest.raises(InvalidArgument) as caught:
        normalise(IdType.POS_CARD, "9" * 129, "", False, FIELD)
    assert caught.value.code == "IDENTIFIER_TOO_LONG"


def test_masking_hides_the_middle_of_a_phone() -> None:
    assert mask(IdType.PHONE, "+8613912345678") == "139****5678"
    assert mask(IdType.POS_CARD, "ab") == "**"
    assert mask(IdType.POS_CARD, "CARD123456") == "CA******56"


def test_dedupe_keeps_the_verified_copy() -> None:
    unverified = ObservedIdentifier(IdType.PHONE, "+8613912345678", "", False)
    verified = ObservedIdentifier(IdType.PHONE, "+8613912345678", "", True)
    assert dedupe([unverified, verified, unverified]) == [verified]


mobiles = st.from_regex(r"1[3-9][0-9]{9}", fullmatch=True)


@given(mobiles)
def test_normalising_is_idempotent(raw: str) -> None:
    try:
        once = normalise(IdType.PHONE, raw, "", False, FIELD).value
    except InvalidArgument:
        return  # not an allocated mainland range: refusing it is right
    assert normalise(IdType.PHONE, once, "", False, FIELD).value == once


@given(st.text(min_size=1, max_size=64))
def test_mask_never_reveals_the_whole_value(value: str) -> None:
    shown = mask(IdType.POS_CARD, value)
    assert len(shown) == len(value)
    if len(value) > 4:
        assert shown != value or set(value[2:-2]) == {"*"}


def test_vault_round_trips_and_hashes_deterministically() -> None:
    vault = PiiVault("ZGV2LW9ubHktcGlpLWtleS1jaGFuZ2UtbWUtMzJieXQ=")
    blob = vault.encrypt("+8613912345678")
    assert b"13912345678" not in blob
    assert vault.decrypt(blob) == "+8613912345678"
    assert vault.lookup_hash("x") == vault.lookup_hash("x") != vault.lookup_hash("y")


def _consent(channel: ConsentChannel, granted: bool) -> ConsentRecord:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    return ConsentRecord("m", ConsentPurpose.MARKETING, channel, granted, "mp", "member", at)


def test_consent_changes_name_only_answers_that_changed() -> None:
    sms, wecom, push = ConsentChannel.SMS, ConsentChannel.WECOM, ConsentChannel.APP_PUSH
    m = ConsentPurpose.MARKETING
    before = {(m, sms): _consent(sms, True), (m, wecom): _consent(wecom, True)}
    after = {
        (m, sms): _consent(sms, False),  # refused now
        (m, push): _consent(push, True),  # a first record
        # wecom lost its record: no consent (opt-in) -> a refusal
    }
    assert consent_changes(before, after) == [(m, wecom, False), (m, sms, False), (m, push, True)]
    assert consent_changes(after, after) == []
    # A refusal that loses its record is still no consent: nothing to say.
    assert consent_changes({(m, sms): _consent(sms, False)}, {}) == []


def test_event_channels_are_member_words_and_empty_for_all() -> None:
    assert [event_channel(c) for c in ConsentChannel] == [
        "wecom",
        "sms",
        "mini_program",
        "app_push",
        "",
    ]
