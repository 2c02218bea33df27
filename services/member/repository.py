"""SQL of the member service (asyncpg; statements are schema-qualified)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from servicekit.db import Connection

from .domain import IdType


@dataclass(frozen=True)
class MemberRecord:
    member_id: str
    member_number: str
    registered_at: datetime
    phone_masked: str


@dataclass(frozen=True)
class IdentityRow:
    id_type: str
    namespace: str
    value_hash: bytes
    value_cipher: bytes
    value_masked: str
    verified: bool


def _record(row: object) -> MemberRecord:
    return MemberRecord(
        member_id=str(row["id"]),  # type: ignore[index]
        member_number=row["member_number"],  # type: ignore[index]
        registered_at=row["registered_at"],  # type: ignore[index]
        phone_masked=row["phone_masked"] or "",  # type: ignore[index]
    )


async def lock_identifier_hashes(conn: Connection, hashes: list[bytes]) -> None:
    """Serialise concurrent identifies that share an identifier.

    Locks are taken in sorted order, so two calls with overlapping sets never
    deadlock; they are transaction-scoped and released at commit.
    """
    for value_hash in sorted(hashes):
        await conn.execute(
            "SELECT pg_advisory_xact_lock(('x' || substr(encode($1::bytea, 'hex'), 1, 16))::bit(64)::bigint)",
            value_hash,
        )


async def members_owning(conn: Connection, rows: list[IdentityRow]) -> list[tuple[str, str]]:
    """(member_id, id_type) for every stored identity among `rows`."""
    found = await conn.fetch(
        "SELECT i.member_id, i.id_type FROM member.identities i"
        " JOIN unnest($1::text[], $2::text[], $3::bytea[]) AS q(t, n, h)"
        " ON i.id_type = q.t AND i.namespace = q.n AND i.value_hash = q.h",
        [r.id_type for r in rows],
        [r.namespace for r in rows],
        [r.value_hash for r in rows],
    )
    return [(str(r["member_id"]), r["id_type"]) for r in found]


async def insert_member(conn: Connection, source: str, phone_masked: str) -> MemberRecord:
    row = await conn.fetchrow(
        "INSERT INTO member.members (id, member_number, registration_source, phone_masked)"
        " VALUES ($1, nextval('member.member_number_seq')::text, $2, $3)"
        " RETURNING id, member_number, registered_at, phone_masked",
        uuid.uuid4(),
        source,
        phone_masked or None,
    )
    return _record(row)


async def attach_identities(
    conn: Connection, member_id: str, rows: list[IdentityRow], source: str
) -> None:
    await conn.executemany(
        "INSERT INTO member.identities"
        " (member_id, id_type, namespace, value_hash, value_cipher, value_masked, verified, source)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        " ON CONFLICT (id_type, namespace, value_hash) DO NOTHING",
        [
            (
                uuid.UUID(member_id),
                r.id_type,
                r.namespace,
                r.value_hash,
                r.value_cipher,
                r.value_masked,
                r.verified,
                source,
            )
            for r in rows
        ],
    )


async def set_phone_masked_if_missing(conn: Connection, member_id: str, masked: str) -> None:
    await conn.execute(
        "UPDATE member.members SET phone_masked = $2 WHERE id = $1 AND phone_masked IS NULL",
        uuid.UUID(member_id),
        masked,
    )


async def get_member(conn: Connection, member_id: str) -> MemberRecord | None:
    row = await conn.fetchrow(
        "SELECT id, member_number, registered_at, phone_masked FROM member.members WHERE id = $1",
        uuid.UUID(member_id),
    )
    return _record(row) if row else None


PHONE = IdType.PHONE.value
