"""SQL of the member rows both halves of the service use (asyncpg; statements
are schema-qualified): the member records, the row locks every writer takes in
id order, enrolment, resolving an id to its live root, a root's cluster and the
masked phone shown for it.

OneID's SQL (identities, quarantine, idempotency, merges, do-not-merge, the
review queue, member codes) is in oneid_repository.py; profile, consent, PII
reads and erasure are in profile_repository.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from servicekit.db import Connection

from .domain import (
    IdType,
)

PHONE = IdType.PHONE.value


@dataclass(frozen=True)
class MemberRecord:
    member_id: str
    member_number: str
    registered_at: datetime
    phone_masked: str


@dataclass(frozen=True)
class MemberState:
    """A member row as the merge logic needs it (read under FOR UPDATE)."""

    member_id: str
    registered_at: datetime
    merged_into: str | None
    status: str


def as_uuid(value: str) -> uuid.UUID:
    return uuid.UUID(value)


def as_uuids(values: Iterable[str]) -> list[uuid.UUID]:
    return [uuid.UUID(v) for v in values]


def member_record(row: Any) -> MemberRecord:
    return MemberRecord(
        member_id=str(row["id"]),
        member_number=row["member_number"],
        registered_at=row["registered_at"],
        phone_masked=row["phone_masked"] or "",
    )


async def lock_members(conn: Connection, member_ids: Iterable[str]) -> dict[str, MemberState]:
    """Row locks in id order (the one order every writer uses)."""
    rows = await conn.fetch(
        "SELECT id, registered_at, merged_into, status FROM member.members"
        " WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE",
        as_uuids(sorted(set(member_ids))),
    )
    return {
        str(r["id"]): MemberState(
            str(r["id"]),
            r["registered_at"],
            str(r["merged_into"]) if r["merged_into"] else None,
            r["status"],
        )
        for r in rows
    }


# ---- members -----------------------------------------------------------------


async def insert_member(conn: Connection, source: str, at: datetime) -> MemberRecord:
    # `at` is the service's clock, not the database's now(): registration times are
    # compared with the services' clocks (a referral's accept window, lifecycle days).
    row = await conn.fetchrow(
        "INSERT INTO member.members (id, member_number, registration_source, registered_at)"
        " VALUES ($1, nextval('member.member_number_seq')::text, $2, $3)"
        " RETURNING id, member_number, registered_at, phone_masked",
        uuid.uuid4(),
        source,
        at,
    )
    return member_record(row)


async def get_member(conn: Connection, member_id: str) -> MemberRecord | None:
    row = await conn.fetchrow(
        "SELECT id, member_number, registered_at, phone_masked FROM member.members WHERE id = $1",
        as_uuid(member_id),
    )
    return member_record(row) if row else None


async def resolve(conn: Connection, member_id: str) -> tuple[str, str] | None:
    """(root member id, status) of a member id, following one union-find hop."""
    row = await conn.fetchrow(
        "SELECT coalesce(m.merged_into, m.id) AS root, r.status FROM member.members m"
        " JOIN member.members r ON r.id = coalesce(m.merged_into, m.id) WHERE m.id = $1",
        as_uuid(member_id),
    )
    return (str(row["root"]), row["status"]) if row else None


async def resolve_many(conn: Connection, member_ids: Iterable[str]) -> dict[str, tuple[str, str]]:
    """resolve() for many ids in one statement: {id: (root, root's status)};
    an id no member has is absent."""
    rows = await conn.fetch(
        "SELECT m.id, coalesce(m.merged_into, m.id) AS root, r.status FROM member.members m"
        " JOIN member.members r ON r.id = coalesce(m.merged_into, m.id)"
        " WHERE m.id = ANY($1::uuid[])",
        as_uuids(set(member_ids)),
    )
    return {str(r["id"]): (str(r["root"]), r["status"]) for r in rows}


async def member_by_number(conn: Connection, number: str) -> str | None:
    value = await conn.fetchval("SELECT id FROM member.members WHERE member_number = $1", number)
    return str(value) if value else None


async def cluster_of(conn: Connection, root_id: str) -> list[str]:
    """The root and every member merged into it."""
    rows = await conn.fetch(
        "SELECT id FROM member.members WHERE id = $1 OR merged_into = $1 ORDER BY id",
        as_uuid(root_id),
    )
    return [str(r["id"]) for r in rows]


async def refresh_phone_masked(conn: Connection, member_ids: Iterable[str]) -> None:
    """Display phone = the member's verified phone, else its first phone."""
    await conn.execute(
        "UPDATE member.members m SET phone_masked = ("
        "  SELECT i.value_masked FROM member.identities i"
        "  WHERE i.member_id = m.id AND i.id_type = $2 ORDER BY i.verified DESC, i.id LIMIT 1)"
        " WHERE m.id = ANY($1::uuid[])",
        as_uuids(member_ids),
        PHONE,
    )
