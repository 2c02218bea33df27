"""SQL of OneID merges and unmerges (asyncpg, schema-qualified): moving the
absorbed member's contacts, orders, tags and notes to the survivor with each
moved row recorded under the merge, moving exactly those back on an unmerge,
and the binding changes an unmerge makes (restore, drop, delete).
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from servicekit.db import Connection

from .repository import S


async def merge_member_rows(
    conn: Connection, merge_id: str, survivor: uuid.UUID, absorbed: uuid.UUID
) -> None:
    """What the absorbed member held here now belongs to the survivor: WeCom
    contacts, orders (attribution stays with its guide), tags, notes. Each
    moved row is recorded under the merge (merge_moves) for its unmerge."""
    contacts = await conn.fetch(
        f"UPDATE {S}.contacts SET member_id = $1 WHERE member_id = $2 RETURNING external_userid",
        survivor,
        absorbed,
    )
    orders = await conn.fetch(
        f"UPDATE {S}.orders SET member_id = $1 WHERE member_id = $2 RETURNING order_id",
        survivor,
        absorbed,
    )
    notes = await conn.fetch(
        f"UPDATE {S}.notes SET member_id = $1 WHERE member_id = $2 RETURNING id", survivor, absorbed
    )
    tags = await conn.fetch(
        f"SELECT tag, source, set_by, set_at FROM {S}.member_tags WHERE member_id = $1", absorbed
    )
    added = {
        (r["tag"], r["source"])
        for r in await conn.fetch(
            f"INSERT INTO {S}.member_tags (member_id, tag, source, set_by, set_at)"
            f" SELECT $1, tag, source, set_by, set_at FROM {S}.member_tags WHERE member_id = $2"
            " ON CONFLICT DO NOTHING RETURNING tag, source",
            survivor,
            absorbed,
        )
    }
    await conn.execute(f"DELETE FROM {S}.member_tags WHERE member_id = $1", absorbed)
    moves: list[tuple[str, str, dict[str, Any]]] = [
        *[("contact", r["external_userid"], {}) for r in contacts],
        *[("order", str(r["order_id"]), {}) for r in orders],
        *[("note", str(r["id"]), {}) for r in notes],
        *[
            (
                "tag",
                f"{r['source']}:{r['tag']}",
                {
                    "tag": r["tag"],
                    "source": r["source"],
                    "set_by": r["set_by"],
                    "set_at": r["set_at"].isoformat(),
                    "added_to_survivor": (r["tag"], r["source"]) in added,
                },
            )
            for r in tags
        ],
    ]
    await record_merge_moves(conn, merge_id, moves)


async def record_merge_moves(
    conn: Connection, merge_id: str, moves: list[tuple[str, str, dict[str, Any]]]
) -> None:
    await conn.executemany(
        f"INSERT INTO {S}.merge_moves (merge_id, kind, ref, detail) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT DO NOTHING",
        [(merge_id, kind, ref, json.dumps(detail)) for kind, ref, detail in moves],
    )


async def merge_moves(conn: Connection, merge_id: str) -> dict[str, list[tuple[str, Any]]]:
    """What the merge moved, by kind: [(ref, detail)]."""
    rows = await conn.fetch(
        f"SELECT kind, ref, detail FROM {S}.merge_moves WHERE merge_id = $1 ORDER BY kind, ref",
        merge_id,
    )
    out: dict[str, list[tuple[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["kind"], []).append((r["ref"], json.loads(r["detail"])))
    return out


async def unmerge_member_rows(
    conn: Connection,
    moves: dict[str, list[tuple[str, Any]]],
    survivor: uuid.UUID,
    restored: uuid.UUID,
) -> None:
    """Move back to the restored member exactly the contacts, orders, notes and
    tags its merge moved, where they still sit with the survivor."""
    refs = {kind: [ref for ref, _ in moves.get(kind, [])] for kind in ("contact", "order", "note")}
    await conn.execute(
        f"UPDATE {S}.contacts SET member_id = $1 WHERE member_id = $2"
        " AND external_userid = ANY($3::text[])",
        restored,
        survivor,
        refs["contact"],
    )
    await conn.execute(
        f"UPDATE {S}.orders SET member_id = $1 WHERE member_id = $2 AND order_id = ANY($3::uuid[])",
        restored,
        survivor,
        [uuid.UUID(r) for r in refs["order"]],
    )
    await conn.execute(
        f"UPDATE {S}.notes SET member_id = $1 WHERE member_id = $2 AND id = ANY($3::bigint[])",
        restored,
        survivor,
        [int(r) for r in refs["note"]],
    )
    for _, tag in moves.get("tag", []):
        set_at = datetime.fromisoformat(tag["set_at"])
        await conn.execute(
            f"INSERT INTO {S}.member_tags (member_id, tag, source, set_by, set_at)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            restored,
            tag["tag"],
            tag["source"],
            tag["set_by"],
            set_at,
        )
        if tag["added_to_survivor"]:
            # Only the copy the merge made: a tag set on the survivor since stays.
            await conn.execute(
                f"DELETE FROM {S}.member_tags WHERE member_id = $1 AND tag = $2 AND source = $3"
                " AND set_by = $4 AND set_at = $5",
                survivor,
                tag["tag"],
                tag["source"],
                tag["set_by"],
                set_at,
            )


async def forget_merge_moves(conn: Connection, merge_id: str) -> None:
    """The unmerge is applied: a later copy of its event finds nothing to move."""
    await conn.execute(f"DELETE FROM {S}.merge_moves WHERE merge_id = $1", merge_id)


async def restore_binding(
    conn: Connection,
    member_id: uuid.UUID,
    from_staff: str,
    staff_id: str,
    store_id: str,
    bound_at: datetime,
    actor: str,
    at: datetime,
) -> None:
    """Put back a binding as it was (its own bound_at: who bound first still
    counts); the history records the change at `at`."""
    await conn.execute(
        f"INSERT INTO {S}.bindings (member_id, staff_id, store_id, bound_at)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT (member_id) DO UPDATE SET"
        " staff_id = EXCLUDED.staff_id, store_id = EXCLUDED.store_id, bound_at = EXCLUDED.bound_at",
        member_id,
        staff_id,
        store_id,
        bound_at,
    )
    await conn.execute(
        f"INSERT INTO {S}.binding_history (member_id, from_staff_id, to_staff_id, reason, actor,"
        " changed_at) VALUES ($1, $2, $3, 'unmerge', $4, $5)",
        member_id,
        from_staff,
        staff_id,
        actor,
        at,
    )


async def drop_binding(
    conn: Connection, member_id: uuid.UUID, from_staff: str, actor: str, at: datetime
) -> None:
    """The member had no guide before the merge gave it one: none again."""
    await delete_binding(conn, member_id)
    await conn.execute(
        f"INSERT INTO {S}.binding_history (member_id, from_staff_id, to_staff_id, reason, actor,"
        " changed_at) VALUES ($1, $2, '', 'unmerge', $3, $4)",
        member_id,
        from_staff,
        actor,
        at,
    )


async def delete_binding(conn: Connection, member_id: uuid.UUID) -> None:
    await conn.execute(f"DELETE FROM {S}.bindings WHERE member_id = $1", member_id)
