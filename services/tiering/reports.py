"""Distribution report: members per tier, segment and stage after each batch run,
with the movement since the run before."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from servicekit.db import Connection

DIMENSIONS = ("tier", "segment", "segment_group", "stage", "relative_tier")


@dataclass(frozen=True)
class Bucket:
    dimension: str
    value: str
    members: int
    change: int


@dataclass(frozen=True)
class Report:
    run_id: int
    as_of: datetime | None
    members: int
    tier_changes: int
    segment_changes: int
    stage_changes: int
    buckets: list[Bucket]


async def distribution(conn: Connection) -> dict[str, dict[str, int]]:
    """Counts per value of every dimension, as they stand now."""
    out: dict[str, dict[str, int]] = {d: {} for d in DIMENSIONS}
    for row in await conn.fetch(
        "SELECT tier_code, count(*) AS n FROM tiering.member_tiers GROUP BY 1"
    ):
        out["tier"][row["tier_code"]] = row["n"]
    # One scan of the profiles for the four dimensions (was one scan each).
    profile_dims = ("segment", "segment_group", "stage", "relative_tier")
    sets = ", ".join(f"({d})" for d in profile_dims)
    rows = await conn.fetch(
        f"SELECT {', '.join(profile_dims)}, count(*) AS n FROM tiering.member_profiles"
        f" GROUP BY GROUPING SETS ({sets})"
    )
    for row in rows:
        for dim in profile_dims:
            if row[dim] is not None:
                out[dim][row[dim]] = row["n"]
    return out


def buckets(now: dict[str, dict[str, int]], before: dict[str, dict[str, int]]) -> list[Bucket]:
    result = []
    for dim in DIMENSIONS:
        values = sorted(set(now.get(dim, {})) | set(before.get(dim, {})))
        for value in values:
            n = now.get(dim, {}).get(value, 0)
            result.append(Bucket(dim, value, n, n - before.get(dim, {}).get(value, 0)))
    return result


async def latest(conn: Connection) -> Report:
    rows = await conn.fetch(
        "SELECT run_id, as_of, members, tier_changes, segment_changes, stage_changes,"
        " distribution::text AS distribution FROM tiering.recompute_runs"
        " WHERE finished_at IS NOT NULL ORDER BY run_id DESC LIMIT 2"
    )
    if not rows:
        return Report(0, None, 0, 0, 0, 0, [])
    last = rows[0]
    before = json.loads(rows[1]["distribution"]) if len(rows) > 1 else {}
    return Report(
        last["run_id"],
        last["as_of"],
        last["members"],
        last["tier_changes"],
        last["segment_changes"],
        last["stage_changes"],
        buckets(json.loads(last["distribution"]), before),
    )
