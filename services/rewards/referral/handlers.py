"""Use cases of referral, each given a unit of work.

Accepting an invite checks every abuse rule before anything is written (a
refusal raises; the unit of work rolls back), then links the invitee once and
grants the registration step's rewards. The first-order step is granted by
rewards' own OrderCompleted (consumers.py): the referral's first_order_id is
set by a conditional UPDATE, and each (referral, step, side) reward row is
claimed by its primary key, so redelivery or retries grant nothing twice.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from servicekit.db import UnitOfWork
from servicekit.errors import Conflict, DomainError, InvalidArgument, NotFound

from .. import merges
from ..mall.handlers import CouponIssuer, issued_coupon_id
from ..orders.domain import parse_member_id
from ..points.earning import period_start
from ..points.handlers import PointsLedger, refuse_erased
from . import repository as repo
from .domain import (
    Acceptance,
    Fission,
    ReferralRules,
    Role,
    Step,
    fingerprints,
    new_invite_code,
    normalise_invite_code,
    refusal,
    reward_issue_key,
)

COUPON_REASON_REFERRAL = "referral"
CODE_ATTEMPTS = 8


@dataclass(frozen=True)
class InviteCode:
    member_id: str
    code: str
    created_at: datetime


@dataclass(frozen=True)
class RewardView:
    step: str
    role: str
    member_id: str
    status: str
    coupon_id: str
    points: int
    refusals: list[dict[str, str]]


@dataclass(frozen=True)
class ReferralView:
    referral_id: str
    inviter_id: str
    invitee_id: str
    accepted_at: datetime
    first_order_at: datetime | None
    rewards: list[RewardView] = field(default_factory=list)
    replayed: bool = False


def _view(row: Any, rewards: list[Any], replayed: bool = False) -> ReferralView:
    return ReferralView(
        referral_id=str(row["id"]),
        inviter_id=str(row["inviter_id"]),
        invitee_id=str(row["invitee_id"]),
        accepted_at=row["accepted_at"],
        first_order_at=row["first_order_at"],
        rewards=[
            RewardView(
                step=r["step"],
                role=r["role"],
                member_id=str(r["member_id"]),
                status=r["status"],
                coupon_id=r["coupon_id"] or "",
                points=r["points"],
                refusals=json.loads(r["refusals"])
                if isinstance(r["refusals"], str)
                else r["refusals"],
            )
            for r in rewards
            if r["referral_id"] == row["id"]
        ],
        replayed=replayed,
    )


def _refusal_doc(error: DomainError) -> dict[str, str]:
    return {"code": error.code, "message": error.message}


class Referrals:
    def __init__(
        self, points: PointsLedger, rules: ReferralRules, issue_coupon: CouponIssuer
    ) -> None:
        self._points = points
        self.rules = rules
        self._issue_coupon = issue_coupon

    async def invite_code(self, uow: UnitOfWork, member_id: str, device_id: str = "") -> InviteCode:
        """The member's code, made on first ask (stable afterwards). A device id
        given here is remembered so the inviter's own device cannot be an invitee."""
        prints = fingerprints(device_id, ())
        conn = uow.conn
        asked = uuid.UUID(parse_member_id(member_id))
        await refuse_erased(conn, asked)
        # After a OneID merge the person keeps one code: the holder's own, or
        # the one an absorbed id already shared (it credits the holder).
        person = await merges.person_of(conn, asked)
        member = person[0]
        if prints:
            await repo.record_fingerprints(conn, member, Role.INVITER.value, prints)
        row = await repo.invite_code_of(conn, person)
        attempts = 0
        while row is None:
            attempts += 1
            # 30^8 codes: a collision is rare, several in a row mean a bug.
            assert attempts <= CODE_ATTEMPTS, "invite code space exhausted"
            row = await repo.insert_invite_code(conn, member, new_invite_code())
            if row is None:
                # Either another request made this member's code, or the code was taken.
                row = await repo.invite_code_of(conn, person)
        return InviteCode(str(member), row["code"], row["created_at"])

    async def record_refusal(
        self, uow: UnitOfWork, invitee_id: str, invite_code: str, code: str, now: datetime
    ) -> None:
        """Count an invite refused as abuse (ABUSE_REFUSALS), after the refused
        accept rolled back: the referral dashboard's abuse refusals."""
        invitee = uuid.UUID(parse_member_id(invitee_id))
        normalised = normalise_invite_code(invite_code)
        inviter = await repo.inviter_of_code(uow.conn, normalised)
        await repo.insert_refusal(uow.conn, code, normalised, inviter, invitee, now)

    async def accept(
        self,
        uow: UnitOfWork,
        invitee_id: str,
        invite_code: str,
        *,
        invitee_registered_at: datetime | None,
        device_id: str,
        identifier_hashes: list[str],
        now: datetime,
    ) -> ReferralView:
        invitee = uuid.UUID(parse_member_id(invitee_id))
        code = normalise_invite_code(invite_code)
        if invitee_registered_at is None:
            raise InvalidArgument(
                "invitee_registered_at is required",
                code="REGISTERED_AT_REQUIRED",
                field="invitee_registered_at",
            )
        prints = fingerprints(device_id, identifier_hashes)
        conn = uow.conn
        await refuse_erased(conn, invitee)
        # Both sides as people: the ids merged into each count as theirs.
        invitees = await merges.person_of(conn, invitee)
        invitee = invitees[0]
        maker = await repo.inviter_of_code(conn, code)
        if maker is None:
            raise NotFound(
                f"invite code {code} does not exist",
                code="UNKNOWN_INVITE_CODE",
                field="invite_code",
            )
        # The referral is the code maker's (an unmerge gives it back with the
        # code); its rules and rewards apply to whoever holds the maker now.
        inviter = await merges.holder_of(conn, maker)
        existing = await self._existing(conn, invitees, inviter)
        if existing is not None:
            return existing
        inviters = await merges.person_of(conn, inviter)
        await repo.lock_fingerprints(conn, prints)
        facts = Acceptance(
            inviter_id=str(inviter),
            invitee_id=str(invitee),
            invitee_registered_at=invitee_registered_at,
            now=now,
            invitee_has_orders=await repo.has_settled_orders(conn, invitees),
            inviter_invited_by_invitee=await repo.invited_by(conn, inviters, invitees),
            shares_fingerprint_with_inviter=bool(prints)
            and await repo.shares_fingerprint(conn, inviters, prints),
            invitees_on_fingerprint=await repo.invitees_on_fingerprints(conn, prints, invitee)
            if prints
            else 0,
        )
        refused = refusal(facts, self.rules)
        if refused is not None:
            raise refused
        row = await repo.insert_referral(
            conn, uuid.uuid4(), maker, invitee, code, invitee_registered_at, now
        )
        if row is None:
            # Linked by a concurrent accept that committed first.
            existing = await self._existing(conn, invitees, inviter)
            assert existing is not None
            return existing
        await repo.record_fingerprints(conn, invitee, Role.INVITEE.value, prints)
        await self.grant(uow, row, Step.REGISTRATION, now)
        rewards = await repo.rewards_of(conn, [row["id"]])
        return _view(row, rewards)

    async def _existing(
        self, conn: Any, invitees: list[uuid.UUID], inviter: uuid.UUID
    ) -> ReferralView | None:
        row = await repo.referral_of_invitee(conn, invitees)
        if row is None:
            return None
        if await merges.holder_of(conn, row["inviter_id"]) != inviter:
            raise Conflict(
                f"member {invitees[0]} already accepted another member's invite",
                code="ALREADY_REFERRED",
                field="invite_code",
            )
        return _view(row, await repo.rewards_of(conn, [row["id"]]), replayed=True)

    async def on_order_completed(
        self, uow: UnitOfWork, member_id: str, order_id: str, ordered_at: datetime, now: datetime
    ) -> ReferralView | None:
        """The invitee's first completed order grants the first-order step, once."""
        row = await repo.mark_first_order(
            uow.conn, uuid.UUID(member_id), uuid.UUID(order_id), ordered_at
        )
        if row is None:
            return None
        await self.grant(uow, row, Step.FIRST_ORDER, now)
        return _view(row, await repo.rewards_of(uow.conn, [row["id"]]))

    async def grant(self, uow: UnitOfWork, referral: Any, step: Step, now: datetime) -> None:
        """Both sides' rewards of one step; each part that is refused (cap,
        coupon stock, paused template) is recorded on the reward row, and the
        rest is still granted."""
        conn = uow.conn
        # Rewards go to whoever holds each side now (a OneID merge moves them).
        inviter = await merges.holder_of(conn, referral["inviter_id"])
        invitee = await merges.holder_of(conn, referral["invitee_id"])
        for role in Role:
            spec = self.rules.step(step).for_role(role)
            if spec.empty:
                continue
            member = inviter if role is Role.INVITER else invitee
            if not await repo.claim_reward(conn, referral["id"], step.value, role.value, member):
                continue
            key = reward_issue_key(str(referral["id"]), step, role)
            refusals: list[dict[str, str]] = []
            coupon_id: str | None = None
            points, txn = 0, None
            # A merge found both sides to be one person: a self-referral after
            # the fact. Nothing more is granted to either side (nor counted).
            self_referral = inviter == invitee
            capped = (
                not self_referral
                and role is Role.INVITER
                and not await repo.count_inviter_reward(
                    conn,
                    await merges.person_of(conn, inviter),
                    period_start(self.rules.period, now),
                    self.rules.max_rewarded_per_inviter,
                )
            )
            if self_referral:
                refusals.append(
                    {
                        "code": "SELF_REFERRAL",
                        "message": "inviter and invitee were merged into one member",
                    }
                )
            elif capped:
                refusals.append(
                    {
                        "code": "INVITER_REWARD_CAP_REACHED",
                        "message": f"the inviter earns at most {self.rules.max_rewarded_per_inviter}"
                        f" referral rewards per {self.rules.period.value}",
                    }
                )
            else:
                if spec.coupon_template_id:
                    try:
                        # A savepoint: a refused coupon leaves the rest of the step intact.
                        async with conn.transaction():
                            issued = await self._issue_coupon(
                                conn,
                                template_id=spec.coupon_template_id,
                                member_id=member,
                                reason=COUPON_REASON_REFERRAL,
                                issue_key=key,
                                now=now,
                            )
                        coupon_id = issued_coupon_id(issued)
                    except DomainError as exc:
                        refusals.append(_refusal_doc(exc))
                if spec.points_action:
                    try:
                        async with conn.transaction():
                            outcome = await self._points.record_action(
                                uow, str(member), spec.points_action, key, now
                            )
                        if outcome.error is not None:
                            refusals.append(_refusal_doc(outcome.error))
                        else:
                            assert outcome.value is not None
                            points, txn = outcome.value.points, outcome.value.transaction_id
                    except DomainError as exc:
                        refusals.append(_refusal_doc(exc))
            parts = int(bool(spec.coupon_template_id)) + int(bool(spec.points_action))
            refused = self_referral or len(refusals) >= parts
            status = "refused" if refused else "partial" if refusals else "granted"
            await repo.finish_reward(
                conn,
                referral["id"],
                step.value,
                role.value,
                status=status,
                coupon_id=coupon_id,
                points=points,
                points_transaction_id=txn,
                refusals=refusals,
            )

    async def of_invitee(self, uow: UnitOfWork, invitee_id: str) -> ReferralView:
        """The member's own referral as an invitee (its person's: the first
        accepted by any merged id), with its rewards; NOT_FOUND NOT_REFERRED."""
        invitee = uuid.UUID(parse_member_id(invitee_id))
        person = await merges.person_of(uow.conn, invitee)
        row = await repo.referral_of_invitee(uow.conn, person)
        if row is None:
            raise NotFound(
                f"member {invitee_id} was not referred", code="NOT_REFERRED", field="member_id"
            )
        return _view(row, await repo.rewards_of(uow.conn, [row["id"]]))

    async def list_of_inviter(
        self, uow: UnitOfWork, inviter_id: str, before: int | None, size: int
    ) -> tuple[list[ReferralView], int | None]:
        """The inviter's invitees, newest first, with their rewards; the cursor
        of the next page (None: last page)."""
        inviter = uuid.UUID(parse_member_id(inviter_id))
        person = await merges.person_of(uow.conn, inviter)
        rows = await repo.referrals_of_inviter(uow.conn, person, before, size + 1)
        more = len(rows) > size
        rows = rows[:size]
        rewards = await repo.rewards_of(uow.conn, [r["id"] for r in rows]) if rows else []
        return [_view(r, rewards) for r in rows], (rows[-1]["seq"] if more else None)

    async def fission(self, uow: UnitOfWork, start: datetime, end: datetime) -> Fission:
        if end <= start:
            raise InvalidArgument("to must be after from", code="INVALID_PERIOD", field="to")
        return Fission(*await repo.fission_counts(uow.conn, start, end))
