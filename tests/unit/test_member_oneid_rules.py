"""OneID rules without I/O: the policy file, junk, limits, survivorship,
consent, the member code and PII key rotation."""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime, timedelta

import pytest

from servicekit.errors import InvalidArgument
from services.member.domain import (
    CODE_LENGTH,
    ConsentChannel,
    ConsentPurpose,
    ConsentRecord,
    Holding,
    IdType,
    Observation,
    choose_survivor,
    effective_consent,
    effective_profile,
    limit_violations,
    member_code,
    member_code_is_genuine,
)
from services.member.pii import PiiKeyError, PiiVault, parse_keyring
from services.member.policy import PolicyError, load_policy, parse_policy

POLICY = load_policy()
T0 = datetime(2026, 1, 1, tzinfo=UTC)
BASE_KEY = "ZGV2LW9ubHktcGlpLWtleS1jaGFuZ2UtbWUtMzJieXQ="


def test_policy_file_covers_every_type_and_says_who_may_merge() -> None:
    assert POLICY.of(IdType.WECHAT_UNIONID).may_merge(verified=False)
    assert POLICY.of(IdType.PHONE).may_merge(verified=True)
    assert not POLICY.of(IdType.PHONE).may_merge(verified=False)
    for attach_only in (IdType.WECHAT_OPENID, IdType.POS_CARD, IdType.DELIVERY_PLATFORM_ID):
        assert not POLICY.of(attach_only).may_merge(verified=True)


@pytest.mark.parametrize(
    ("id_type", "value"),
    [
        (IdType.PHONE, "+8613800000000"),
        (IdType.PHONE, "+8613800138000"),
        (IdType.PHONE, "+8615900000000"),
        (IdType.POS_CARD, "000000"),
        (IdType.POS_CARD, "88888888"),
        (IdType.WECHAT_UNIONID, "TEST"),
        (IdType.WECHAT_UNIONID, "placeholder_1"),
    ],
)
def test_blocklist_catches_test_and_placeholder_values(id_type: IdType, value: str) -> None:
    assert POLICY.is_junk(id_type, value)


@pytest.mark.parametrize(
    ("id_type", "value"),
    [
        (IdType.PHONE, "+8613912345678"),
        (IdType.POS_CARD, "C1029384"),
        (IdType.WECHAT_UNIONID, "oU9x"),
    ],
)
def test_blocklist_leaves_real_values(id_type: IdType, value: str) -> None:
    assert not POLICY.is_junk(id_type, value)


def test_member_numbers_we_issued_are_never_junk() -> None:
    assert POLICY.is_junk(IdType.POS_CARD, "11111111")
    assert not POLICY.is_junk(IdType.MEMBER_NUMBER, "11111111")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"types": {"nope": {}}}, "unknown identifier type"),
        ({"types": {"phone": {"merge": "sometimes", "priority": 1}}}, "merge must be"),
        ({"types": {"phone": {"merge": "never", "priority": 1}}}, "no entry for"),
        (
            {
                "types": {
                    t.value: {"merge": "never", "priority": 1, "max_per_member": 0} for t in IdType
                }
            },
            "positive integer",
        ),
        (
            {
                "types": {t.value: {"merge": "never", "priority": 1} for t in IdType},
                "blocklist": {"regex": [{"pattern": "("}]},
            },
            r"blocklist\.regex\[0\]",
        ),
    ],
)
def test_a_bad_policy_stops_the_service(data: dict, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy(data)


def phone(verified: bool) -> Holding:
    return Holding(IdType.PHONE, "", verified)


def test_limits_two_verified_phones_or_two_unionids_conflict() -> None:
    assert limit_violations(POLICY, [[phone(True)], [phone(True)]]) == ["phone_verified"]
    unionid = Holding(IdType.WECHAT_UNIONID, "", True)
    assert limit_violations(POLICY, [[unionid], [unionid]]) == ["wechat_unionid"]
    assert limit_violations(POLICY, [[phone(True)], [phone(False)]]) == []


def test_openid_limit_counts_per_app() -> None:
    app1 = Holding(IdType.WECHAT_OPENID, "app1", False)
    app2 = Holding(IdType.WECHAT_OPENID, "app2", False)
    assert limit_violations(POLICY, [[app1], [app2]]) == []
    assert limit_violations(POLICY, [[app1], [app1]]) == ["wechat_openid"]


def test_an_overridden_limit_is_not_broken_again_by_adding_nothing() -> None:
    already = [phone(True), phone(True)]  # an operator approved this
    assert limit_violations(POLICY, [already, [Holding(IdType.POS_CARD, "", False)]]) == []
    assert limit_violations(POLICY, [already, [phone(True)]]) == ["phone_verified"]


def test_member_numbers_have_no_limit() -> None:
    number = Holding(IdType.MEMBER_NUMBER, "", True)
    assert limit_violations(POLICY, [[number]] * 5) == []


def test_oldest_survives_whatever_the_order() -> None:
    members = [(T0 + timedelta(days=2), "b"), (T0, "c"), (T0, "a")]
    assert choose_survivor(members) == "a"
    assert choose_survivor(list(reversed(members))) == "a"


def test_profile_prefers_the_latest_verified_value() -> None:
    obs = [
        Observation("m1", "nickname", "verified-old", "mp", True, T0),
        Observation("m2", "nickname", "typed-new", "pos", False, T0 + timedelta(days=1)),
        Observation("m2", "gender", "female", "pos", False, T0),
    ]
    assert effective_profile(obs) == {"nickname": "verified-old", "gender": "female"}


def record(member: str, granted: bool, at: datetime) -> ConsentRecord:
    return ConsentRecord(
        member, ConsentPurpose.MARKETING, ConsentChannel.SMS, granted, "mp", "member", at
    )


def test_consent_most_restrictive_then_latest_explicit_choice() -> None:
    key = (ConsentPurpose.MARKETING, ConsentChannel.SMS)
    merged_at = T0 + timedelta(days=5)
    before = [record("root", True, T0 + timedelta(days=1)), record("gone", False, T0)]
    assert not effective_consent(before, "root", merged_at)[key].granted
    after = [*before, record("root", True, merged_at + timedelta(minutes=1))]
    assert effective_consent(after, "root", merged_at)[key].granted
    # No merge: simply the latest choice.
    assert effective_consent(
        [record("root", False, T0), record("root", True, T0 + timedelta(1))], "root", None
    )[key].granted


SECRET = b"test-secret"


def test_member_codes_differ_per_issue_and_carry_their_mac() -> None:
    codes = {member_code(SECRET, nonce) for nonce in (1, 2, 10**11 - 1)}
    assert len(codes) == 3
    assert all(len(c) == CODE_LENGTH and c.isdigit() for c in codes)
    assert all(member_code_is_genuine(SECRET, c) for c in codes)


def test_member_code_forgeries_are_refused() -> None:
    code = member_code(SECRET, 4242)
    assert not member_code_is_genuine(b"other-secret", code)
    # Another random part with this code's MAC.
    swapped = code[0] + f"{4243:011d}" + code[12:]
    assert not member_code_is_genuine(SECRET, swapped)
    with pytest.raises(InvalidArgument) as caught:
        member_code_is_genuine(SECRET, "9" + code[1:])
    assert caught.value.code == "MALFORMED_MEMBER_CODE"


def test_vault_rotates_keys_and_reads_old_ciphertexts() -> None:
    new_key = base64.b64encode(os.urandom(32)).decode()
    old = PiiVault(BASE_KEY)
    blob = old.encrypt("+8613912345678")
    rotated = PiiVault(BASE_KEY, parse_keyring(f"k1:{new_key}"), "k1")
    assert rotated.decrypt(blob) == "+8613912345678"
    fresh = rotated.encrypt("+8613912345678")
    assert PiiVault.key_id_of(fresh) == "k1"
    # Lookup hashes do not rotate; suppression hashes are a different key.
    assert rotated.lookup_hash("x") == old.lookup_hash("x") != old.suppression_hash("x")
    with pytest.raises(PiiKeyError):
        old.decrypt(fresh)  # k1 unknown to the old vault
    with pytest.raises(PiiKeyError):
        PiiVault(BASE_KEY, {}, "k9")
    # Relabelling a ciphertext's key id breaks its authentication.
    forged = blob[:2] + b"k1" + blob[4:]
    with pytest.raises(Exception):  # noqa: B017
        rotated.decrypt(forged)
