"""SQL of OneID (asyncpg; schema-qualified): identifiers and their advisory
locks, quarantine and identifier links, identify's idempotency records, merges
and their reversal, the do-not-merge list, the merge review queue, and the
dynamic member codes a till scans.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from servicekit.db import Connection

from .domain import (
    Holding,
    IdType,
)
from .repository import MemberRecord, as_uuid, as_uuids, member_record


@dataclass(frozen=True)
class IdentityRow:
    id_type: str
    namespace: str
    value_hash: bytes
    value_cipher: bytes
    value_masked: str
    verified: bool
    key_id: str = "k0"

    @property
    def ref(self) -> tuple[str, str, bytes]:
        return (self.id_type, self.namespace, self.value_hash)


@dataclass(frozen=True)
class StoredIdentity:
    identity_id: int
    id_type: str
    namespace: str
    value_hash: bytes
    member_id: str
    verified: bool
    quarantined: bool
    # The owner as of the same snapshot (for the read-only fast path).
    owner: MemberRecord
    owner_live: bool

    @property
    def ref(self) -> tuple[str, str, bytes]:
        return (self.id_type, self.namespace, self.value_hash)


@dataclass(frozen=True)
class MergeRow:
    merge_id: str
    survivor_id: str
    absorbed_id: str
    rule: str
    evidence: list[str]
    status: str
    merged_at: datetime
    moved_identity_ids: list[int]
    repointed_member_ids: list[str]
    actor: str = ""
    unmerged_at: datetime | None = None
    unmerged_by: str = ""
    unmerge_reason: str = ""

    @property
    def automatic(self) -> bool:
        """Merged by identify under the identity policy, not by a person."""
        return self.rule.startswith("identify:")


@dataclass(frozen=True)
class ReviewRow:
    review_id: str
    status: str
    member_ids: list[str]
    reason: str
    detail: str
    evidence: list[str]
    created_at: datetime
    decided_at: datetime | None
    decided_by: str
    note: str
    merge_ids: list[str]


@dataclass(frozen=True)
class QuarantineRow:
    id_type: str
    namespace: str
    value_masked: str
    linked_members: int
    quarantined_at: datetime
    value_hash: bytes = b""

    @property
    def key(self) -> QuarantineKey:
        return (self.quarantined_at, self.id_type, self.namespace, self.value_hash)


# A page boundary of the quarantine list: (quarantined_at, id_type, namespace, value_hash).
QuarantineKey = tuple[datetime, str, str, bytes]


@dataclass(frozen=True)
class PriorRequest:
    request_hash: bytes
    member_id: str
    created: bool
    outcome: dict[str, Any]


def _unnest_refs(refs: list[tuple[str, str, bytes]]) -> tuple[list[str], list[str], list[bytes]]:
    return [r[0] for r in refs], [r[1] for r in refs], [r[2] for r in refs]


# ---- locking -----------------------------------------------------------------


def advisory_key(value_hash: bytes) -> int:
    """Signed 64-bit advisory lock key from the first 8 bytes of a keyed hash."""
    return int.from_bytes(value_hash[:8], "big", signed=True)


async def lock_hashes(conn: Connection, hashes: list[bytes]) -> None:
    """Serialise concurrent calls that share an identifier (or a request key).

    Keys are locked in ascending order, one statement; two calls with
    overlapping sets therefore never deadlock on them. Transaction-scoped:
    released at commit or rollback.
    """
    keys = sorted({advisory_key(h) for h in hashes})
    await conn.execute(
        "SELECT count(pg_advisory_xact_lock(k)) FROM unnest($1::bigint[]) AS t(k)",
        keys,
    )


# ---- identities ----------------------------------------------------------------


async def find_identities(
    conn: Connection, refs: list[tuple[str, str, bytes]]
) -> dict[tuple[str, str, bytes], StoredIdentity]:
    """Stored identities among `refs`, with quarantine and owner, in one statement
    (one snapshot)."""
    types, namespaces, hashes = _unnest_refs(refs)
    rows = await conn.fetch(
        "SELECT i.id AS identity_id, i.id_type, i.namespace, i.value_hash, i.member_id,"
        " i.verified, q.value_hash IS NOT NULL AS quarantined, m.id, m.member_number,"
        " m.registered_at, m.phone_masked, m.merged_into IS NULL AND m.status = 'active' AS live"
        " FROM member.identities i"
        " JOIN unnest($1::text[], $2::text[], $3::bytea[]) AS u(t, n, h)"
        " ON i.id_type = u.t AND i.namespace = u.n AND i.value_hash = u.h"
        " JOIN member.members m ON m.id = i.member_id"
        " LEFT JOIN member.quarantined_identifiers q"
        " ON q.id_type = u.t AND q.namespace = u.n AND q.value_hash = u.h",
        types,
        namespaces,
        hashes,
    )
    out = {}
    for r in rows:
        stored = StoredIdentity(
            r["identity_id"],
            r["id_type"],
            r["namespace"],
            bytes(r["value_hash"]),
            str(r["member_id"]),
            r["verified"],
            r["quarantined"],
            member_record(r),
            r["live"],
        )
        out[stored.ref] = stored
    return out


async def attach_identities(
    conn: Connection, member_id: str, rows: list[IdentityRow], source: str
) -> None:
    """Callers hold the advisory locks of these identifiers, so none exists yet."""
    await conn.executemany(
        "INSERT INTO member.identities (member_id, id_type, namespace, value_hash,"
        " value_cipher, value_masked, verified, source, key_id)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        [
            (
                as_uuid(member_id),
                r.id_type,
                r.namespace,
                r.value_hash,
                r.value_cipher,
                r.value_masked,
                r.verified,
                source,
                r.key_id,
            )
            for r in rows
        ],
    )


async def mark_verified(conn: Connection, identity_ids: list[int]) -> None:
    await conn.execute(
        "UPDATE member.identities SET verified = true WHERE id = ANY($1::bigint[])", identity_ids
    )


async def holdings(conn: Connection, member_ids: Iterable[str]) -> dict[str, list[Holding]]:
    ids = sorted(set(member_ids))
    out: dict[str, list[Holding]] = {m: [] for m in ids}
    rows = await conn.fetch(
        "SELECT member_id, id_type, namespace, verified FROM member.identities"
        " WHERE member_id = ANY($1::uuid[])",
        as_uuids(ids),
    )
    for r in rows:
        out[str(r["member_id"])].append(
            Holding(IdType(r["id_type"]), r["namespace"], r["verified"])
        )
    return out


async def identity_hashes(conn: Connection, member_ids: Iterable[str]) -> list[bytes]:
    """The lookup hashes of every identifier these members hold (cache invalidation)."""
    rows = await conn.fetch(
        "SELECT value_hash FROM member.identities WHERE member_id = ANY($1::uuid[])",
        as_uuids(member_ids),
    )
    return [bytes(r["value_hash"]) for r in rows]


# ---- quarantine and links --------------------------------------------------------


async def quarantined_among(
    conn: Connection, refs: list[tuple[str, str, bytes]]
) -> set[tuple[str, str, bytes]]:
    if not refs:
        return set()
    types, namespaces, hashes = _unnest_refs(refs)
    rows = await conn.fetch(
        "SELECT q.id_type, q.namespace, q.value_hash FROM member.quarantined_identifiers q"
        " JOIN unnest($1::text[], $2::text[], $3::bytea[]) AS u(t, n, h)"
        " ON q.id_type = u.t AND q.namespace = u.n AND q.value_hash = u.h",
        types,
        namespaces,
        hashes,
    )
    return {(r["id_type"], r["namespace"], bytes(r["value_hash"])) for r in rows}


async def linked_roots(
    conn: Connection, refs: list[tuple[str, str, bytes]]
) -> dict[tuple[str, str, bytes], set[str]]:
    """For each identifier, the live members (union-find roots) it was seen with."""
    types, namespaces, hashes = _unnest_refs(refs)
    rows = await conn.fetch(
        "SELECT l.id_type, l.namespace, l.value_hash, coalesce(m.merged_into, m.id) AS root"
        " FROM member.identifier_links l"
        " JOIN unnest($1::text[], $2::text[], $3::bytea[]) AS u(t, n, h)"
        " ON l.id_type = u.t AND l.namespace = u.n AND l.value_hash = u.h"
        " JOIN member.members m ON m.id = l.member_id",
        types,
        namespaces,
        hashes,
    )
    out: dict[tuple[str, str, bytes], set[str]] = {}
    for r in rows:
        out.setdefault((r["id_type"], r["namespace"], bytes(r["value_hash"])), set()).add(
            str(r["root"])
        )
    return out


async def insert_links(conn: Connection, links: list[tuple[tuple[str, str, bytes], str]]) -> None:
    await conn.executemany(
        "INSERT INTO member.identifier_links (id_type, namespace, value_hash, member_id)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        [(ref[0], ref[1], ref[2], as_uuid(member_id)) for ref, member_id in links],
    )


async def quarantine(conn: Connection, row: IdentityRow, linked_members: int) -> datetime | None:
    """When it was quarantined; None if it already was."""
    quarantined_at: datetime | None = await conn.fetchval(
        "INSERT INTO member.quarantined_identifiers"
        " (id_type, namespace, value_hash, value_masked, linked_members)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING quarantined_at",
        row.id_type,
        row.namespace,
        row.value_hash,
        row.value_masked,
        linked_members,
    )
    return quarantined_at


async def list_quarantined(
    conn: Connection, limit: int, after: QuarantineKey | None = None
) -> list[QuarantineRow]:
    """Newest first; `after` is the last row of the previous page (keyset)."""
    rows = await conn.fetch(
        "SELECT id_type, namespace, value_hash, value_masked, linked_members, quarantined_at"
        " FROM member.quarantined_identifiers"
        " WHERE $2::timestamptz IS NULL"
        " OR (quarantined_at, id_type, namespace, value_hash) < ($2, $3, $4, $5)"
        " ORDER BY quarantined_at DESC, id_type DESC, namespace DESC, value_hash DESC LIMIT $1",
        limit,
        *(after or (None, None, None, None)),
    )
    return [
        QuarantineRow(
            r["id_type"],
            r["namespace"],
            r["value_masked"],
            r["linked_members"],
            r["quarantined_at"],
            bytes(r["value_hash"]),
        )
        for r in rows
    ]


# ---- idempotency ---------------------------------------------------------------


async def preflight(
    conn: Connection, request_key: str, suppression_hashes: list[bytes]
) -> tuple[PriorRequest | None, set[bytes]]:
    """The earlier answer under this request key, and which identifiers belong
    to erased people, in one round trip."""
    row = await conn.fetchrow(
        "SELECT r.request_hash, r.member_id, r.created, r.outcome,"
        " (SELECT coalesce(array_agg(s.suppression_hash), '{}')"
        "  FROM member.suppressed_identifiers s"
        "  WHERE s.suppression_hash = ANY($2::bytea[])) AS suppressed"
        " FROM (SELECT 1) AS one"
        " LEFT JOIN member.identify_requests r ON r.request_key = $1",
        request_key,
        suppression_hashes,
    )
    assert row is not None
    prior = None
    if row["request_hash"] is not None:
        prior = PriorRequest(
            bytes(row["request_hash"]),
            str(row["member_id"]),
            row["created"],
            json.loads(row["outcome"]),
        )
    return prior, {bytes(h) for h in row["suppressed"]}


async def save_request(
    conn: Connection,
    request_key: str,
    request_hash: bytes,
    member_id: str,
    created: bool,
    outcome: dict[str, Any],
) -> bool:
    """False when the key is already taken (another call committed it first)."""
    inserted = await conn.fetchval(
        "INSERT INTO member.identify_requests"
        " (request_key, request_hash, member_id, created, outcome) VALUES ($1, $2, $3, $4, $5)"
        # No conflict target: the key's uniqueness across partitions is the
        # first_only trigger's, which skips a taken key (no row back).
        " ON CONFLICT DO NOTHING RETURNING true",
        request_key,
        request_hash,
        as_uuid(member_id),
        created,
        json.dumps(outcome),
    )
    return bool(inserted)


# ---- merges ----------------------------------------------------------------------


async def move_identities(conn: Connection, from_id: str, to_id: str) -> list[int]:
    rows = await conn.fetch(
        "UPDATE member.identities SET member_id = $2 WHERE member_id = $1 RETURNING id",
        as_uuid(from_id),
        as_uuid(to_id),
    )
    return sorted(r["id"] for r in rows)


async def repoint(conn: Connection, from_root: str, to_root: str) -> list[str]:
    """Flatten: members absorbed into `from_root` now point at `to_root`."""
    rows = await conn.fetch(
        "UPDATE member.members SET merged_into = $2 WHERE merged_into = $1 RETURNING id",
        as_uuid(from_root),
        as_uuid(to_root),
    )
    return sorted(str(r["id"]) for r in rows)


async def set_merged_into(conn: Connection, member_id: str, root: str | None) -> None:
    await conn.execute(
        "UPDATE member.members SET merged_into = $2 WHERE id = $1",
        as_uuid(member_id),
        as_uuid(root) if root else None,
    )


async def insert_merge(
    conn: Connection,
    survivor_id: str,
    absorbed_id: str,
    rule: str,
    evidence: list[str],
    actor: str,
    review_id: str | None,
    moved: list[int],
    repointed: list[str],
    at: datetime,
) -> MergeRow:
    # `at` is the service's clock: consent survivorship compares it with the
    # consent records' times, which come from the same clock.
    row = await conn.fetchrow(
        "INSERT INTO member.merges (id, survivor_id, absorbed_id, rule, evidence, actor,"
        " review_id, moved_identity_ids, repointed_member_ids, merged_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING *",
        uuid.uuid4(),
        as_uuid(survivor_id),
        as_uuid(absorbed_id),
        rule,
        json.dumps(evidence),
        actor,
        as_uuid(review_id) if review_id else None,
        moved,
        as_uuids(repointed),
        at,
    )
    return _merge_row(row)


def _merge_row(row: Any) -> MergeRow:
    return MergeRow(
        merge_id=str(row["id"]),
        survivor_id=str(row["survivor_id"]),
        absorbed_id=str(row["absorbed_id"]),
        rule=row["rule"],
        evidence=json.loads(row["evidence"]),
        status=row["status"],
        merged_at=row["merged_at"],
        moved_identity_ids=list(row["moved_identity_ids"]),
        repointed_member_ids=[str(m) for m in row["repointed_member_ids"]],
        actor=row["actor"],
        unmerged_at=row["unmerged_at"],
        unmerged_by=row["unmerged_by"] or "",
        unmerge_reason=row["unmerge_reason"] or "",
    )


async def merges_by_id(conn: Connection, merge_ids: list[str]) -> list[MergeRow]:
    rows = await conn.fetch(
        "SELECT * FROM member.merges WHERE id = ANY($1::uuid[]) ORDER BY merged_at, id",
        as_uuids(merge_ids),
    )
    return [_merge_row(r) for r in rows]


async def merges_involving(conn: Connection, member_ids: list[str]) -> list[MergeRow]:
    """Merges where any of these members survived or was absorbed, newest first."""
    rows = await conn.fetch(
        "SELECT * FROM member.merges"
        " WHERE survivor_id = ANY($1::uuid[]) OR absorbed_id = ANY($1::uuid[])"
        " ORDER BY merged_at DESC, id DESC",
        as_uuids(member_ids),
    )
    return [_merge_row(r) for r in rows]


async def get_merge(conn: Connection, merge_id: str, for_update: bool = False) -> MergeRow | None:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(f"SELECT * FROM member.merges WHERE id = $1{lock}", as_uuid(merge_id))
    return _merge_row(row) if row else None


async def active_merge_absorbing(conn: Connection, member_id: str) -> MergeRow | None:
    row = await conn.fetchrow(
        "SELECT * FROM member.merges WHERE absorbed_id = $1 AND status = 'active'"
        " ORDER BY merged_at DESC LIMIT 1",
        as_uuid(member_id),
    )
    return _merge_row(row) if row else None


async def last_merge_at(conn: Connection, root_id: str) -> datetime | None:
    value = await conn.fetchval(
        "SELECT max(merged_at) FROM member.merges WHERE survivor_id = $1 AND status = 'active'",
        as_uuid(root_id),
    )
    return value  # type: ignore[no-any-return]


async def move_back(conn: Connection, merge: MergeRow) -> tuple[list[int], list[str]]:
    ids = await conn.fetch(
        "UPDATE member.identities SET member_id = $2"
        " WHERE id = ANY($3::bigint[]) AND member_id = $1 RETURNING id",
        as_uuid(merge.survivor_id),
        as_uuid(merge.absorbed_id),
        merge.moved_identity_ids,
    )
    members = await conn.fetch(
        "UPDATE member.members SET merged_into = $2"
        " WHERE id = ANY($3::uuid[]) AND merged_into = $1 RETURNING id",
        as_uuid(merge.survivor_id),
        as_uuid(merge.absorbed_id),
        as_uuids(merge.repointed_member_ids),
    )
    return sorted(r["id"] for r in ids), sorted(str(r["id"]) for r in members)


async def mark_unmerged(
    conn: Connection, merge_id: str, operator: str, reason: str, at: datetime
) -> datetime:
    return await conn.fetchval(  # type: ignore[no-any-return]
        "UPDATE member.merges SET status = 'unmerged', unmerged_at = $4, unmerged_by = $2,"
        " unmerge_reason = $3 WHERE id = $1 RETURNING unmerged_at",
        as_uuid(merge_id),
        operator,
        reason,
        at,
    )


# ---- do-not-merge ----------------------------------------------------------------


def _pair(a: str, b: str) -> tuple[uuid.UUID, uuid.UUID]:
    x, y = sorted((as_uuid(a), as_uuid(b)))
    return x, y


async def add_do_not_merge(conn: Connection, pairs: list[tuple[str, str]], reason: str) -> None:
    await conn.executemany(
        "INSERT INTO member.do_not_merge (member_a, member_b, reason) VALUES ($1, $2, $3)"
        " ON CONFLICT DO NOTHING",
        [(*_pair(a, b), reason) for a, b in pairs if a != b],
    )


async def remove_do_not_merge(conn: Connection, roots: list[str]) -> None:
    """An operator merged these clusters on purpose: forget pairs between them."""
    await conn.execute(
        "DELETE FROM member.do_not_merge d USING member.members a, member.members b"
        " WHERE a.id = d.member_a AND b.id = d.member_b"
        " AND coalesce(a.merged_into, a.id) = ANY($1::uuid[])"
        " AND coalesce(b.merged_into, b.id) = ANY($1::uuid[])",
        as_uuids(roots),
    )


async def do_not_merge_among(conn: Connection, roots: list[str]) -> list[tuple[str, str]]:
    """Root pairs among `roots` that an operator said must stay apart."""
    rows = await conn.fetch(
        "SELECT DISTINCT coalesce(a.merged_into, a.id) AS ra, coalesce(b.merged_into, b.id) AS rb"
        " FROM member.do_not_merge d"
        " JOIN member.members a ON a.id = d.member_a JOIN member.members b ON b.id = d.member_b"
        " WHERE coalesce(a.merged_into, a.id) = ANY($1::uuid[])"
        " AND coalesce(b.merged_into, b.id) = ANY($1::uuid[])",
        as_uuids(roots),
    )
    return [(str(r["ra"]), str(r["rb"])) for r in rows if r["ra"] != r["rb"]]


# ---- review queue ----------------------------------------------------------------


def _review(row: Any) -> ReviewRow:
    return ReviewRow(
        review_id=str(row["id"]),
        status=row["status"],
        member_ids=[str(m) for m in row["member_ids"]],
        reason=row["reason"],
        detail=row["detail"],
        evidence=json.loads(row["evidence"]),
        created_at=row["created_at"],
        decided_at=row["decided_at"],
        decided_by=row["decided_by"] or "",
        note=row["note"] or "",
        merge_ids=[str(m) for m in row["merge_ids"]],
    )


async def open_review(
    conn: Connection, member_ids: list[str], reason: str, detail: str, evidence: list[str]
) -> str:
    """One pending review per set of members: a repeat returns the open one."""
    ids = as_uuids(sorted(member_ids))
    review_id = await conn.fetchval(
        "INSERT INTO member.merge_reviews (id, member_ids, reason, detail, evidence)"
        " VALUES ($1, $2, $3, $4, $5)"
        " ON CONFLICT (member_ids) WHERE status = 'pending' DO NOTHING RETURNING id",
        uuid.uuid4(),
        ids,
        reason,
        detail,
        json.dumps(evidence),
    )
    if review_id is None:
        review_id = await conn.fetchval(
            "SELECT id FROM member.merge_reviews WHERE member_ids = $1 AND status = 'pending'", ids
        )
    return str(review_id)


async def get_review(
    conn: Connection, review_id: str, for_update: bool = False
) -> ReviewRow | None:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(
        f"SELECT * FROM member.merge_reviews WHERE id = $1{lock}", as_uuid(review_id)
    )
    return _review(row) if row else None


async def list_reviews(
    conn: Connection, status: str, limit: int, after: tuple[datetime, str] | None
) -> list[ReviewRow]:
    if after is None:
        rows = await conn.fetch(
            "SELECT * FROM member.merge_reviews WHERE status = $1 ORDER BY created_at, id LIMIT $2",
            status,
            limit,
        )
    else:
        rows = await conn.fetch(
            "SELECT * FROM member.merge_reviews WHERE status = $1 AND (created_at, id) > ($3, $4)"
            " ORDER BY created_at, id LIMIT $2",
            status,
            limit,
            after[0],
            as_uuid(after[1]),
        )
    return [_review(r) for r in rows]


async def decide_review(
    conn: Connection, review_id: str, status: str, operator: str, note: str, merge_ids: list[str]
) -> ReviewRow:
    row = await conn.fetchrow(
        "UPDATE member.merge_reviews SET status = $2, decided_at = now(), decided_by = $3,"
        " note = $4, merge_ids = $5 WHERE id = $1 RETURNING *",
        as_uuid(review_id),
        status,
        operator,
        note,
        as_uuids(merge_ids),
    )
    return _review(row)


# ---- member codes ------------------------------------------------------------


async def insert_member_code(
    conn: Connection,
    code_hash: bytes,
    member_id: str,
    expires_at: datetime,
    prune_before: datetime,
) -> bool:
    """Record an issued code; False if that code is already taken (draw another)."""
    await conn.execute("DELETE FROM member.member_codes WHERE expires_at < $1", prune_before)
    inserted = await conn.fetchval(
        "INSERT INTO member.member_codes (code_hash, member_id, expires_at) VALUES ($1, $2, $3)"
        " ON CONFLICT DO NOTHING RETURNING true",
        code_hash,
        as_uuid(member_id),
        expires_at,
    )
    return bool(inserted)


async def use_member_code(
    conn: Connection, code_hash: bytes, now: datetime, source: str
) -> str | None:
    """The member of an issued, unused, unexpired code, now marked used (one
    statement: two concurrent scans cannot both have it); None otherwise."""
    member_id = await conn.fetchval(
        "UPDATE member.member_codes SET used_at = $2, used_by = $3"
        " WHERE code_hash = $1 AND used_at IS NULL AND expires_at > $2 RETURNING member_id",
        code_hash,
        now,
        source,
    )
    return None if member_id is None else str(member_id)


async def member_code_state(
    conn: Connection, code_hash: bytes
) -> tuple[datetime | None, datetime] | None:
    """(used_at, expires_at) of an issued code; None when it is unknown."""
    row = await conn.fetchrow(
        "SELECT used_at, expires_at FROM member.member_codes WHERE code_hash = $1", code_hash
    )
    return None if row is None else (row["used_at"], row["expires_at"])


# ---- velocity flags ---------------------------------------------------------------


@dataclass(frozen=True)
class VelocityFlagRow:
    flag_id: str
    id_type: str
    namespace: str
    value_masked: str
    member_id: str
    store_count: int
    store_ids: list[str]
    window_seconds: int
    flagged_at: datetime


def _velocity_flag(row: Any) -> VelocityFlagRow:
    return VelocityFlagRow(
        flag_id=str(row["id"]),
        id_type=row["id_type"],
        namespace=row["namespace"],
        value_masked=row["value_masked"],
        member_id=str(row["member_id"]),
        store_count=row["store_count"],
        store_ids=list(row["store_ids"]),
        window_seconds=row["window_seconds"],
        flagged_at=row["flagged_at"],
    )


async def insert_velocity_flag(
    conn: Connection,
    id_type: str,
    namespace: str,
    value_hash: bytes,
    value_masked: str,
    member_id: str,
    store_ids: list[str],
    window_seconds: int,
    at: datetime,
) -> VelocityFlagRow:
    row = await conn.fetchrow(
        "INSERT INTO member.velocity_flags (id, id_type, namespace, value_hash, value_masked,"
        " member_id, store_count, store_ids, window_seconds, flagged_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING *",
        uuid.uuid4(),
        id_type,
        namespace,
        value_hash,
        value_masked,
        as_uuid(member_id),
        len(store_ids),
        store_ids,
        window_seconds,
        at,
    )
    return _velocity_flag(row)


async def list_velocity_flags(
    conn: Connection, limit: int, after: tuple[datetime, str] | None
) -> list[VelocityFlagRow]:
    """Newest first; `after` is the (flagged_at, id) of the previous page's last."""
    if after is None:
        rows = await conn.fetch(
            "SELECT * FROM member.velocity_flags ORDER BY flagged_at DESC, id DESC LIMIT $1",
            limit,
        )
    else:
        rows = await conn.fetch(
            "SELECT * FROM member.velocity_flags WHERE (flagged_at, id) < ($2, $3)"
            " ORDER BY flagged_at DESC, id DESC LIMIT $1",
            limit,
            after[0],
            as_uuid(after[1]),
        )
    return [_velocity_flag(r) for r in rows]
