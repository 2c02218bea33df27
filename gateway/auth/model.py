"""Clients, their kinds and scopes: pure rules, no I/O."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from servicekit.errors import DomainError


class ClientKind(enum.StrEnum):
    MINIPROGRAM_BACKEND = "miniprogram_backend"
    POS = "pos"
    OPERATOR_CONSOLE = "operator_console"
    OPS_TOOLING = "ops_tooling"


# Scopes. "admin:*" grants every admin:<area>; member:any grants member:self.
MEMBER_SELF = "member:self"
MEMBER_IDENTIFY = "member:identify"
MEMBER_ANY = "member:any"
PII_READ = "pii:read"
POS_CHECKOUT = "pos:checkout"
ADMIN_MEMBERS = "admin:members"
ADMIN_REWARDS = "admin:rewards"
ADMIN_TIERS = "admin:tiers"
ADMIN_JOURNEYS = "admin:journeys"
ADMIN_GUIDES = "admin:guides"
# Read-only dashboards (/v1/admin/analytics/...): the console's "viewer" role.
ADMIN_ANALYTICS = "admin:analytics"
# Dead-lettered stream events: list and redrive (servicekit/deadletters.py).
ADMIN_EVENTS = "admin:events"
# The WeCom sidebar's backend: the guide's workstation routes (each call also
# carries the guide's own session from WeCom's OAuth, docs/guides.md).
GUIDES_WORKSTATION = "guides:workstation"
ADMIN_ALL = "admin:*"

KNOWN_SCOPES = frozenset(
    {
        MEMBER_SELF,
        MEMBER_IDENTIFY,
        MEMBER_ANY,
        PII_READ,
        POS_CHECKOUT,
        ADMIN_MEMBERS,
        ADMIN_REWARDS,
        ADMIN_TIERS,
        ADMIN_JOURNEYS,
        ADMIN_GUIDES,
        ADMIN_ANALYTICS,
        ADMIN_EVENTS,
        GUIDES_WORKSTATION,
        ADMIN_ALL,
    }
)

# What a client of each kind gets when created without --scope. PII is never
# a default: it is granted to a named operator client on purpose.
DEFAULT_SCOPES: dict[ClientKind, tuple[str, ...]] = {
    ClientKind.MINIPROGRAM_BACKEND: (MEMBER_SELF, MEMBER_IDENTIFY),
    ClientKind.POS: (POS_CHECKOUT,),
    ClientKind.OPERATOR_CONSOLE: (
        MEMBER_ANY,
        ADMIN_MEMBERS,
        ADMIN_REWARDS,
        ADMIN_TIERS,
        ADMIN_JOURNEYS,
        ADMIN_GUIDES,
        ADMIN_ANALYTICS,
        ADMIN_EVENTS,
    ),
    ClientKind.OPS_TOOLING: (MEMBER_ANY, ADMIN_ALL),
}

# Kinds that serve people operating the platform: only they may hold admin
# scopes or pii:read (refused at registration for any other kind).
OPERATOR_KINDS = frozenset({ClientKind.OPERATOR_CONSOLE, ClientKind.OPS_TOOLING})


def operator_only(scope: str) -> bool:
    return scope.startswith("admin:") or scope == PII_READ


# A scope that stands for another, wider one.
_IMPLIED_BY: dict[str, str] = {MEMBER_SELF: MEMBER_ANY}


def grants(scopes: Iterable[str], needed: str) -> bool:
    held = set(scopes)
    if needed in held or _IMPLIED_BY.get(needed) in held:
        return True
    area = needed.split(":", 1)[0]
    return f"{area}:*" in held


def acts_as_member_only(scopes: Iterable[str]) -> bool:
    """A caller with member:self but not member:any acts for the member it asserts."""
    held = set(scopes)
    return MEMBER_ANY not in held


@dataclass(frozen=True)
class Credential:
    """One active key of one client, as the request path needs it."""

    key_id: str
    client_id: str
    kind: ClientKind
    store_id: str
    scopes: frozenset[str]
    secret: str
    rate_per_second: float | None = None
    burst: int | None = None
    # miniprogram_backend only: the WeChat app ids it may speak for.
    app_ids: frozenset[str] = frozenset()


class Unauthenticated(DomainError):
    """Who is calling could not be established: 401 / UNAUTHENTICATED."""

    status = grpc.StatusCode.UNAUTHENTICATED
    default_code = "UNAUTHENTICATED"


class RateLimited(DomainError):
    """429 / RESOURCE_EXHAUSTED, with when to retry."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_code = "RATE_LIMITED"

    def __init__(self, message: str, *, retry_after_ms: int, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_ms = retry_after_ms
