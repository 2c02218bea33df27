"""SQL of a member's person (asyncpg; schema-qualified): the identities shown
with PII and their re-encryption, profile observations, consent with history,
the PII access log, and erasure (the cluster's personal data and the
suppression hashes that stop an erased person being recognised again).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from servicekit.db import Connection

from .domain import (
    ConsentChannel,
    ConsentPurpose,
    ConsentRecord,
    Observation,
)
from .repository import PHONE, as_uuid, as_uuids


@dataclass(frozen=True)
class IdentityView:
    member_id: str
    id_type: str
    namespace: str
    value_masked: str
    value_cipher: bytes
    verified: bool
    source: str
    attached_at: datetime
    value_hash: bytes = b""


async def identities_of(conn: Connection, member_ids: Iterable[str]) -> list[IdentityView]:
    rows = await conn.fetch(
        "SELECT member_id, id_type, namespace, value_masked, value_cipher, verified, source,"
        " created_at, value_hash FROM member.identities WHERE member_id = ANY($1::uuid[])"
        " ORDER BY id",
        as_uuids(member_ids),
    )
    return [
        IdentityView(
            str(r["member_id"]),
            r["id_type"],
            r["namespace"],
            r["value_masked"],
            bytes(r["value_cipher"]),
            r["verified"],
            r["source"],
            r["created_at"],
            bytes(r["value_hash"]),
        )
        for r in rows
    ]


async def phone_cipher(conn: Connection, member_ids: list[str]) -> bytes | None:
    value = await conn.fetchval(
        "SELECT value_cipher FROM member.identities WHERE member_id = ANY($1::uuid[])"
        " AND id_type = $2 ORDER BY verified DESC, id LIMIT 1",
        as_uuids(member_ids),
        PHONE,
    )
    return bytes(value) if value is not None else None


async def ciphers_not_under(conn: Connection, key_id: str, limit: int) -> list[tuple[int, bytes]]:
    rows = await conn.fetch(
        "SELECT id, value_cipher FROM member.identities WHERE key_id <> $1"
        " ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
        key_id,
        limit,
    )
    return [(r["id"], bytes(r["value_cipher"])) for r in rows]


async def replace_ciphers(conn: Connection, key_id: str, rows: list[tuple[int, bytes]]) -> None:
    await conn.executemany(
        "UPDATE member.identities SET value_cipher = $2, key_id = $3 WHERE id = $1",
        [(identity_id, blob, key_id) for identity_id, blob in rows],
    )


async def count_not_under(conn: Connection, key_id: str) -> int:
    return int(
        await conn.fetchval("SELECT count(*) FROM member.identities WHERE key_id <> $1", key_id)
    )


# ---- suppression (erased people) --------------------------------------------------


async def unsuppress(conn: Connection, hashes: list[bytes]) -> None:
    await conn.execute(
        "DELETE FROM member.suppressed_identifiers WHERE suppression_hash = ANY($1::bytea[])",
        hashes,
    )


async def suppress(conn: Connection, hashes: list[bytes]) -> None:
    await conn.executemany(
        "INSERT INTO member.suppressed_identifiers (suppression_hash) VALUES ($1)"
        " ON CONFLICT DO NOTHING",
        [(h,) for h in hashes],
    )


# ---- profile and consent ---------------------------------------------------------


async def add_observations(
    conn: Connection, member_id: str, values: dict[str, str], source: str, verified: bool
) -> None:
    await conn.executemany(
        "INSERT INTO member.profile_observations (member_id, field, value, source, verified)"
        " VALUES ($1, $2, $3, $4, $5)",
        [(as_uuid(member_id), k, v, source, verified) for k, v in values.items()],
    )


async def observations(conn: Connection, member_ids: list[str]) -> list[Observation]:
    rows = await conn.fetch(
        "SELECT member_id, field, value, source, verified, observed_at"
        " FROM member.profile_observations WHERE member_id = ANY($1::uuid[]) ORDER BY id",
        as_uuids(member_ids),
    )
    return [
        Observation(
            str(r["member_id"]),
            r["field"],
            r["value"],
            r["source"],
            r["verified"],
            r["observed_at"],
        )
        for r in rows
    ]


async def add_consent(
    conn: Connection,
    member_id: str,
    purpose: ConsentPurpose,
    channel: ConsentChannel,
    granted: bool,
    source: str,
    actor: str,
    at: datetime,
) -> datetime:
    """Returns when the choice was recorded (the event carries it): `at`, the
    service's clock, as every other time the service compares."""
    return await conn.fetchval(  # type: ignore[no-any-return]
        "INSERT INTO member.consent_records"
        " (member_id, purpose, channel, granted, source, actor, recorded_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING recorded_at",
        as_uuid(member_id),
        purpose.value,
        channel.value,
        granted,
        source,
        actor,
        at,
    )


async def consents(conn: Connection, member_ids: list[str]) -> list[ConsentRecord]:
    rows = await conn.fetch(
        "SELECT member_id, purpose, channel, granted, source, actor, recorded_at"
        " FROM member.consent_records WHERE member_id = ANY($1::uuid[])"
        " ORDER BY recorded_at, id",
        as_uuids(member_ids),
    )
    return [
        ConsentRecord(
            str(r["member_id"]),
            ConsentPurpose(r["purpose"]),
            ConsentChannel(r["channel"]),
            r["granted"],
            r["source"],
            r["actor"],
            r["recorded_at"],
        )
        for r in rows
    ]


# ---- PII audit, erasure, member codes ----------------------------------------------


async def audit_pii_read(
    conn: Connection, member_id: str, accessor: str, purpose: str, fields: list[str]
) -> None:
    await conn.execute(
        "INSERT INTO member.pii_access_log (member_id, accessor, purpose, fields)"
        " VALUES ($1, $2, $3, $4)",
        as_uuid(member_id),
        accessor,
        purpose,
        fields,
    )


async def erase_cluster(conn: Connection, member_ids: list[str]) -> None:
    """Everything personal of these members goes; ids stay as tombstones."""
    ids = as_uuids(member_ids)
    await conn.execute("DELETE FROM member.identities WHERE member_id = ANY($1::uuid[])", ids)
    await conn.execute("DELETE FROM member.identifier_links WHERE member_id = ANY($1::uuid[])", ids)
    await conn.execute(
        "DELETE FROM member.profile_observations WHERE member_id = ANY($1::uuid[])", ids
    )
    await conn.execute(
        "DELETE FROM member.identify_requests WHERE member_id = ANY($1::uuid[])", ids
    )
    await conn.execute("DELETE FROM member.member_codes WHERE member_id = ANY($1::uuid[])", ids)
    await conn.execute(
        "UPDATE member.merges SET status = 'erased', evidence = '[]'::jsonb"
        " WHERE survivor_id = ANY($1::uuid[]) OR absorbed_id = ANY($1::uuid[])",
        ids,
    )
    await conn.execute(
        "UPDATE member.merge_reviews SET status = 'closed', evidence = '[]'::jsonb,"
        " decided_at = now(), decided_by = 'erasure'"
        " WHERE status = 'pending' AND member_ids && $1::uuid[]",
        ids,
    )
    await conn.execute(
        "UPDATE member.members SET status = 'erased', erased_at = now(), phone_masked = NULL,"
        " registration_source = 'erased' WHERE id = ANY($1::uuid[])",
        ids,
    )
