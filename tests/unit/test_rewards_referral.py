"""Referral rules: invite codes, abuse refusals, the configured programme, fission."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from servicekit.errors import InvalidArgument
from services.rewards.referral.domain import (
    INVITE_ALPHABET,
    INVITE_CODE_LENGTH,
    Acceptance,
    Fission,
    ReferralRules,
    Role,
    Step,
    fingerprints,
    new_invite_code,
    normalise_invite_code,
    parse_referral_rules,
    refusal,
    reward_issue_key,
)

NOW = datetime(2026, 5, 1, 4, 0, tzinfo=UTC)
OK = Acceptance(
    inviter_id="a",
    invitee_id="b",
    invitee_registered_at=NOW - timedelta(minutes=5),
    now=NOW,
    invitee_has_orders=False,
    inviter_invited_by_invitee=False,
    shares_fingerprint_with_inviter=False,
    invitees_on_fingerprint=0,
)
RULES = ReferralRules()


def test_codes_use_only_the_unambiguous_alphabet() -> None:
    for _ in range(200):
        code = new_invite_code()
        assert len(code) == INVITE_CODE_LENGTH and set(code) <= set(INVITE_ALPHABET)
    assert not set("01OIL") & set(INVITE_ALPHABET)


@given(st.text(alphabet=INVITE_ALPHABET, min_size=INVITE_CODE_LENGTH, max_size=INVITE_CODE_LENGTH))
def test_typed_codes_normalise(code: str) -> None:
    typed = f" {code[:4].lower()}-{code[4:]} "
    assert normalise_invite_code(typed) == code


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("", "INVITE_CODE_REQUIRED"),
        ("ABC", "INVALID_INVITE_CODE"),
        ("O0O0O0O0", "INVALID_INVITE_CODE"),
    ],
)
def test_bad_codes_are_refused(raw: str, code: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        normalise_invite_code(raw)
    assert (caught.value.code, caught.value.field) == (code, "invite_code")


def test_a_fresh_invitee_is_accepted() -> None:
    assert refusal(OK, RULES) is None


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"invitee_id": "a"}, "SELF_REFERRAL"),
        ({"shares_fingerprint_with_inviter": True}, "SELF_REFERRAL"),
        ({"inviter_invited_by_invitee": True}, "REFERRAL_CYCLE"),
        ({"invitee_has_orders": True}, "INVITEE_ALREADY_MEMBER"),
        ({"invitee_registered_at": NOW - timedelta(hours=73)}, "INVITEE_ALREADY_MEMBER"),
        ({"invitees_on_fingerprint": 1}, "FINGERPRINT_ALREADY_USED"),
    ],
)
def test_abuse_is_refused_with_its_code(change: dict[str, object], code: str) -> None:
    refused = refusal(replace(OK, **change), RULES)  # type: ignore[arg-type]
    assert refused is not None and refused.code == code


@given(hours=st.integers(0, 500), window=st.integers(1, 240))
def test_accept_window_is_the_boundary(hours: int, window: int) -> None:
    rules = ReferralRules(accept_window_hours=window)
    facts = replace(OK, invitee_registered_at=NOW - timedelta(hours=hours))
    refused = refusal(facts, rules)
    assert (refused is None) == (hours <= window)


def test_fingerprints_hash_and_deduplicate() -> None:
    prints = fingerprints("dev-1", ["h1", "h1", " "])
    assert len(prints) == 2 and prints == sorted(prints)
    assert all(len(p) == 32 and b"dev-1" not in p for p in prints)
    assert fingerprints("", []) == []
    with pytest.raises(InvalidArgument) as caught:
        fingerprints("x" * 200, [])
    assert caught.value.field == "device_id"
    with pytest.raises(InvalidArgument):
        fingerprints("", [f"h{i}" for i in range(20)])


def test_rules_parse_from_json_and_refuse_typos() -> None:
    rules = parse_referral_rules(
        json.dumps(
            {
                "registration": {"invitee": {"coupon_template_id": "NEW-20"}},
                "first_order": {
                    "inviter": {"coupon_template_id": "INV-20", "points_action": "referral"}
                },
                "max_rewarded_per_inviter": 5,
                "period": "week",
            }
        )
    )
    assert rules.step(Step.REGISTRATION).for_role(Role.INVITEE).coupon_template_id == "NEW-20"
    assert rules.step(Step.REGISTRATION).for_role(Role.INVITER).empty
    assert rules.coupon_templates() == {"NEW-20", "INV-20"}
    assert parse_referral_rules("") == ReferralRules()
    with pytest.raises(ValueError, match="REWARDS_REFERRAL_RULES"):
        parse_referral_rules('{"registration": {"inviter": {"coupon": "x"}}}')
    with pytest.raises(ValueError):
        parse_referral_rules('{"max_rewarded_per_inviter": 0}')


def test_issue_keys_differ_per_step_and_side() -> None:
    keys = {reward_issue_key("r1", s, r) for s in Step for r in Role}
    assert len(keys) == 4 and all(len(k) <= 128 for k in keys)


def test_fission_coefficient_and_spread() -> None:
    f = Fission(inviters=10, invitees=18, second_generation=9)
    assert f.coefficient == pytest.approx(1.8)
    assert f.second_generation_spread == pytest.approx(0.5)
    assert Fission(0, 0, 0).coefficient == 0.0
    assert Fission(3, 6, 2, seed_inviters=2, seed_invitees=6).seed_spread == pytest.approx(3.0)
    assert Fission(0, 0, 0).seed_spread == 0.0
