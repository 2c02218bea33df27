"""Operator roles, what each may do in the console, and the gateway scopes its
client holds (docs/console.md, "Roles"). The console hides what a role cannot
do and refuses a forged request with 403; the gateway refuses it again, because
the client the console uses for a role does not hold the scope."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    VIEWER = "viewer"
    MARKETER = "marketer"
    MEMBER_ADMIN = "member_admin"
    PII_READER = "pii_reader"


class Right(StrEnum):
    DASHBOARDS = "dashboards"
    COUPONS = "coupons"
    JOURNEYS = "journeys"
    EVENTS = "events"
    MERGE_REVIEWS = "merge_reviews"
    QUARANTINE = "quarantine"
    MEMBERS = "members"
    # Finding a member by phone or member number: the gateway's lookup route
    # is admin:members, which only the member admin's client holds.
    FIND_MEMBERS = "find_members"
    ADJUST_POINTS = "adjust_points"
    # Dead-lettered stream events and their redrive (gateway scope admin:events).
    DEAD_LETTERS = "dead_letters"
    UNMASK = "unmask"


ADMIN_ANALYTICS = "admin:analytics"

RIGHTS: dict[Role, frozenset[Right]] = {
    Role.VIEWER: frozenset({Right.DASHBOARDS}),
    Role.MARKETER: frozenset({Right.DASHBOARDS, Right.COUPONS, Right.JOURNEYS, Right.EVENTS}),
    Role.MEMBER_ADMIN: frozenset(
        {
            Right.DASHBOARDS,
            Right.MERGE_REVIEWS,
            Right.QUARANTINE,
            Right.MEMBERS,
            Right.FIND_MEMBERS,
            Right.ADJUST_POINTS,
            Right.DEAD_LETTERS,
        }
    ),
    Role.PII_READER: frozenset({Right.DASHBOARDS, Right.MEMBERS, Right.UNMASK}),
}

# The scopes `make run` (and an operator deploying the console) registers each
# role's gateway client with. admin:rewards is the scope of the coupon routes
# and of the points adjustment route alike (gateway/auth/policy.py).
SCOPES: dict[Role, tuple[str, ...]] = {
    Role.VIEWER: (ADMIN_ANALYTICS,),
    Role.MARKETER: (ADMIN_ANALYTICS, "admin:rewards", "admin:journeys"),
    Role.MEMBER_ADMIN: (
        ADMIN_ANALYTICS,
        "admin:members",
        "admin:rewards",
        "member:any",
        "admin:events",
    ),
    Role.PII_READER: (ADMIN_ANALYTICS, "member:any", "pii:read"),
}


def rights_of(roles: list[str] | tuple[str, ...]) -> frozenset[Right]:
    granted: set[Right] = set()
    for name in roles:
        granted |= RIGHTS[Role(name)]
    return frozenset(granted)


def role_for(roles: list[str] | tuple[str, ...], right: Right) -> Role | None:
    """The operator's role whose gateway client acts for this right (the least
    powerful one that has it), or None."""
    for role in Role:  # declaration order: least powerful first
        if role.value in roles and right in RIGHTS[role]:
            return role
    return None
