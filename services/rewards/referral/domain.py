"""Referral (裂变) rules: invite codes, who may accept an invite, which rewards
each step grants. Pure: no I/O; handlers.py applies them.

The programme is configuration (REWARDS_REFERRAL_RULES, JSON, see
`parse_referral_rules`): for each step (registration, first_order) and each
side (inviter, invitee), a coupon template and/or a points action of the
earning rules (so the ledger's own `record_action` posts the points).
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from servicekit.errors import FailedPrecondition, InvalidArgument

from ..points.earning import Period

# Crockford-like: no 0/O, 1/I/L, and no U, so a code read aloud or typed from
# a poster is not misread.
INVITE_ALPHABET = "23456789ABCDEFGHJKMNPQRSTVWXYZ"
INVITE_CODE_LENGTH = 8
MAX_DEVICE_ID_LENGTH = 128
MAX_FINGERPRINTS = 8
# Refusals at acceptance that are abuse, counted for the referral dashboard
# (rewards.referral_refusals); a malformed request or unknown code is not.
ABUSE_REFUSALS = frozenset(
    {"SELF_REFERRAL", "REFERRAL_CYCLE", "FINGERPRINT_ALREADY_USED", "INVITEE_ALREADY_MEMBER"}
)


class Step(enum.StrEnum):
    REGISTRATION = "registration"
    FIRST_ORDER = "first_order"


class Role(enum.StrEnum):
    INVITER = "inviter"
    INVITEE = "invitee"


class RewardSpec(BaseModel):
    """What one side gets at one step: a coupon, points, or both."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    coupon_template_id: str = ""
    # An action of the earning rules (its points and its own per-period cap).
    points_action: str = ""

    @property
    def empty(self) -> bool:
        return not self.coupon_template_id and not self.points_action


class StepRewards(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    inviter: RewardSpec = RewardSpec()
    invitee: RewardSpec = RewardSpec()

    def for_role(self, role: Role) -> RewardSpec:
        return self.inviter if role is Role.INVITER else self.invitee


class ReferralRules(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    registration: StepRewards = StepRewards()
    # Defaults: each side earns the "referral" action's points on the
    # invitee's first order (rewards for a registration alone invite fakes).
    first_order: StepRewards = StepRewards(
        inviter=RewardSpec(points_action="referral"), invitee=RewardSpec()
    )
    # An invite is accepted only this soon after the invitee registered:
    # later, the invitee was already a member.
    accept_window_hours: int = Field(default=72, ge=1)
    # Rewarded referrals per inviter per period; past it the link is made but
    # the inviter's rewards are refused (INVITER_REWARD_CAP_REACHED).
    max_rewarded_per_inviter: int = Field(default=20, ge=1)
    period: Period = Period.MONTH
    # How many invitees one device or identifier hash may stand behind.
    max_invitees_per_fingerprint: int = Field(default=1, ge=1)

    def step(self, step: Step) -> StepRewards:
        return self.registration if step is Step.REGISTRATION else self.first_order

    def coupon_templates(self) -> set[str]:
        return {
            spec.coupon_template_id
            for s in Step
            for role in Role
            if (spec := self.step(s).for_role(role)).coupon_template_id
        }


def parse_referral_rules(doc: str) -> ReferralRules:
    """Rules from JSON; empty: the defaults.

    {"registration": {"invitee": {"coupon_template_id": "NEW-20"}},
     "first_order": {"inviter": {"coupon_template_id": "INVITE-20", "points_action": "referral"},
                     "invitee": {}},
     "accept_window_hours": 72, "max_rewarded_per_inviter": 20, "period": "month",
     "max_invitees_per_fingerprint": 1}
    """
    if not doc.strip():
        return ReferralRules()
    try:
        return ReferralRules.model_validate_json(doc)
    except ValidationError as exc:
        raise ValueError(f"REWARDS_REFERRAL_RULES is invalid: {exc}") from None


def new_invite_code() -> str:
    return "".join(secrets.choice(INVITE_ALPHABET) for _ in range(INVITE_CODE_LENGTH))


def normalise_invite_code(raw: str) -> str:
    """The code as stored: upper case, spaces and dashes dropped; refused when
    it cannot be one this service made."""
    code = raw.strip().upper().replace("-", "").replace(" ", "")
    if not code:
        raise InvalidArgument(
            "invite_code is required", code="INVITE_CODE_REQUIRED", field="invite_code"
        )
    if len(code) != INVITE_CODE_LENGTH or any(c not in INVITE_ALPHABET for c in code):
        raise InvalidArgument(
            f"invite_code must be {INVITE_CODE_LENGTH} characters of {INVITE_ALPHABET}",
            code="INVALID_INVITE_CODE",
            field="invite_code",
        )
    return code


def fingerprint(kind: str, value: str) -> bytes:
    """SHA-256 of a device id or identifier hash: rewards never stores raw values."""
    return hashlib.sha256(f"referral|{kind}|{value}".encode()).digest()


def fingerprints(device_id: str, identifier_hashes: Iterable[str]) -> list[bytes]:
    """The abuse fingerprints of one party, sorted (the order locks are taken in)."""
    if len(device_id) > MAX_DEVICE_ID_LENGTH or (device_id and not device_id.isprintable()):
        raise InvalidArgument(
            f"device_id must be at most {MAX_DEVICE_ID_LENGTH} printable characters",
            code="INVALID_DEVICE_ID",
            field="device_id",
        )
    hashes = [h.strip() for h in identifier_hashes if h.strip()]
    if len(hashes) > MAX_FINGERPRINTS or any(len(h) > MAX_DEVICE_ID_LENGTH for h in hashes):
        raise InvalidArgument(
            f"at most {MAX_FINGERPRINTS} identifier hashes of at most {MAX_DEVICE_ID_LENGTH}"
            " characters",
            code="INVALID_IDENTIFIER_HASHES",
            field="identifier_hashes",
        )
    found = {fingerprint("identifier", h) for h in hashes}
    if device_id.strip():
        found.add(fingerprint("device", device_id.strip()))
    return sorted(found)


@dataclass(frozen=True)
class Acceptance:
    """What the service found about an invite being accepted."""

    inviter_id: str
    invitee_id: str
    invitee_registered_at: datetime
    now: datetime
    # The invitee already has a completed order here.
    invitee_has_orders: bool
    # The invitee invited the inviter (directly): a ring.
    inviter_invited_by_invitee: bool
    # The fingerprints shared with the inviter, and how many other invitees
    # stand behind the most used of the invitee's fingerprints.
    shares_fingerprint_with_inviter: bool
    invitees_on_fingerprint: int


def refusal(a: Acceptance, rules: ReferralRules) -> FailedPrecondition | None:
    """Why this invite may not be accepted, or None."""
    if a.inviter_id == a.invitee_id:
        return FailedPrecondition(
            "a member cannot accept their own invite", code="SELF_REFERRAL", field="invite_code"
        )
    if a.shares_fingerprint_with_inviter:
        return FailedPrecondition(
            "the invitee's device or identifier is the inviter's",
            code="SELF_REFERRAL",
            field="device_id",
        )
    if a.inviter_invited_by_invitee:
        return FailedPrecondition(
            "the inviter was invited by this invitee", code="REFERRAL_CYCLE", field="invite_code"
        )
    too_old = a.now - a.invitee_registered_at > timedelta(hours=rules.accept_window_hours)
    if too_old or a.invitee_has_orders:
        return FailedPrecondition(
            "the invitee was already a member before accepting the invite",
            code="INVITEE_ALREADY_MEMBER",
            field="member_id",
        )
    if a.invitees_on_fingerprint >= rules.max_invitees_per_fingerprint:
        return FailedPrecondition(
            "this device or identifier already stands behind another invitee",
            code="FINGERPRINT_ALREADY_USED",
            field="device_id",
        )
    return None


def reward_issue_key(referral_id: str, step: Step, role: Role) -> str:
    """One key per referral, step and side: a retry or redelivery grants nothing twice."""
    return f"referral:{referral_id}:{step.value}:{role.value}"


@dataclass(frozen=True)
class Fission:
    """Spread of a period: inviters, their invitees, the invitees' own invitees."""

    inviters: int
    invitees: int
    second_generation: int
    # Inviters never invited themselves, and the invitees they brought in.
    seed_inviters: int = 0
    seed_invitees: int = 0

    @property
    def coefficient(self) -> float:
        """Invitees per inviter (the plan aims at 1.8)."""
        return self.invitees / self.inviters if self.inviters else 0.0

    @property
    def second_generation_spread(self) -> float:
        """Second-generation invitees per first-generation invitee."""
        return self.second_generation / self.invitees if self.invitees else 0.0

    @property
    def seed_spread(self) -> float:
        """Invitees per seed inviter (the plan: 1:3)."""
        return self.seed_invitees / self.seed_inviters if self.seed_inviters else 0.0
