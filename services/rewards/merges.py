"""How rewards sees OneID merges (asyncpg): the merges in force, recorded from
member's MemberMerged / MemberUnmerged, and the person behind a member id.

Referral and mall state stays on the member id it was written for; reads go
through the merges in force. A member's *holder* follows absorbed -> survivor
to the member who holds the person now; a holder's *cluster* is itself and
everyone merged into it, directly or through a chain. An unmerge closes the
merge row and every read resolves as before the merge.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from servicekit.db import Connection

MAX_MERGE_DEPTH = 32

HOLDER_SQL = (
    "WITH RECURSIVE up(member_id, depth) AS ("
    " SELECT $1::uuid, 0"
    " UNION ALL"
    " SELECT m.survivor_id, up.depth + 1 FROM up CROSS JOIN LATERAL"
    "  (SELECT survivor_id FROM rewards.member_merges"
    "   WHERE absorbed_id = up.member_id AND unmerged_at IS NULL"
    "   ORDER BY merged_at DESC LIMIT 1) m"
    f" WHERE up.depth < {MAX_MERGE_DEPTH})"
    " SELECT member_id FROM up ORDER BY depth DESC LIMIT 1"
)

# `down`: $1 and every member merged into it (a CTE of WITH RECURSIVE).
CLUSTER_CTE = (
    "down(member_id, depth) AS ("
    " SELECT $1::uuid, 0"
    " UNION"
    " SELECT m.absorbed_id, down.depth + 1 FROM down JOIN rewards.member_merges m"
    "  ON m.survivor_id = down.member_id AND m.unmerged_at IS NULL"
    f" WHERE down.depth < {MAX_MERGE_DEPTH})"
)

# Every merged member's holder, for reports over many members at once.
HOLDERS_CTE = (
    "chain(member_id, holder, depth) AS ("
    " SELECT absorbed_id, survivor_id, 1 FROM rewards.member_merges WHERE unmerged_at IS NULL"
    " UNION ALL"
    " SELECT c.member_id, m.survivor_id, c.depth + 1 FROM chain c"
    "  JOIN rewards.member_merges m ON m.absorbed_id = c.holder AND m.unmerged_at IS NULL"
    f"  WHERE c.depth < {MAX_MERGE_DEPTH}),"
    " holders AS (SELECT DISTINCT ON (member_id) member_id, holder FROM chain"
    "  ORDER BY member_id, depth DESC)"
)


async def record_merge(
    conn: Connection, merge_id: str, absorbed: uuid.UUID, survivor: uuid.UUID, at: datetime
) -> None:
    """MemberMerged, once per merge id (a replay changes nothing)."""
    await conn.execute(
        "INSERT INTO rewards.member_merges (merge_id, absorbed_id, survivor_id, merged_at)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT (merge_id) DO NOTHING",
        merge_id,
        absorbed,
        survivor,
        at,
    )


async def record_unmerge(conn: Connection, merge_id: str, at: datetime) -> None:
    await conn.execute(
        "UPDATE rewards.member_merges SET unmerged_at = $2"
        " WHERE merge_id = $1 AND unmerged_at IS NULL",
        merge_id,
        at,
    )


async def holder_of(conn: Connection, member_id: uuid.UUID) -> uuid.UUID:
    """The member who holds `member_id`'s person now (itself when not merged away)."""
    value = await conn.fetchval(HOLDER_SQL, member_id)
    return value  # type: ignore[no-any-return]


async def person_of(conn: Connection, member_id: uuid.UUID) -> list[uuid.UUID]:
    """The person behind `member_id`: its holder first, then every member
    merged into the holder (directly or through a chain)."""
    holder = await holder_of(conn, member_id)
    rows = await conn.fetch(
        f"WITH RECURSIVE {CLUSTER_CTE} SELECT DISTINCT member_id FROM down", holder
    )
    return [holder, *sorted(r["member_id"] for r in rows if r["member_id"] != holder)]
