"""SQL of what engagement knows of members (asyncpg; schema-qualified): facts
for targeting and goals, consent and the non-personalised choice, subscription
credits, channel addresses, birthdays, locations, tags, and events parked until
their member is known.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from servicekit.db import Connection

from .domain import DEFAULT_TZ, MemberFacts

# ---- member facts, consent, addresses ------------------------------------------


async def member_known(conn: Connection, member_id: uuid.UUID) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT true FROM engagement.member_facts WHERE member_id = $1", member_id
        )
    )


async def ensure_member(conn: Connection, member_id: uuid.UUID) -> None:
    await conn.execute(
        "INSERT INTO engagement.member_facts (member_id) VALUES ($1) ON CONFLICT DO NOTHING",
        member_id,
    )


async def set_zone(
    conn: Connection, member_id: uuid.UUID, profile_tz: str, store_id: str, tz: str
) -> None:
    """What member says (profile zone, registration store) and the zone it
    resolves to, which quiet hours and caps read."""
    await conn.execute(
        "INSERT INTO engagement.member_facts (member_id, profile_tz, store_id, tz)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT (member_id) DO UPDATE SET"
        " profile_tz = excluded.profile_tz, store_id = excluded.store_id, tz = excluded.tz,"
        " updated_at = now()",
        member_id,
        profile_tz,
        store_id,
        tz,
    )


async def load_facts(conn: Connection, member_ids: list[uuid.UUID]) -> dict[str, MemberFacts]:
    """Facts, tags, consent and the non-personalised choice of many members:
    three index scans, whatever the batch size."""
    rows = await conn.fetch(
        "SELECT f.member_id, f.tz, f.tier, f.segment, f.stage, f.order_count,"
        " f.nickname, f.guide_userid, coalesce(p.non_personalised, false) AS np"
        " FROM engagement.member_facts f"
        " LEFT JOIN engagement.preferences p ON p.member_id = f.member_id"
        " WHERE f.member_id = ANY($1::uuid[])",
        member_ids,
    )
    consents = await consents_of(conn, member_ids)
    tags: dict[str, set[str]] = {}
    for r in await conn.fetch(
        "SELECT member_id, tag FROM engagement.member_tags WHERE member_id = ANY($1::uuid[])",
        member_ids,
    ):
        tags.setdefault(str(r["member_id"]), set()).add(r["tag"])
    out: dict[str, MemberFacts] = {}
    for r in rows:
        mid = str(r["member_id"])
        out[mid] = MemberFacts(
            member_id=mid,
            tz=r["tz"] or DEFAULT_TZ,
            tier=r["tier"],
            segment=r["segment"],
            stage=r["stage"],
            order_count=r["order_count"],
            non_personalised=r["np"],
            tags=frozenset(tags.get(mid, ())),
            consents=consents.get(mid, {}),
            nickname=r["nickname"],
            guide_userid=r["guide_userid"],
        )
    return out


async def set_nickname(conn: Connection, member_id: uuid.UUID, nickname: str) -> None:
    """The member's effective nickname (member's NicknameSet)."""
    await conn.execute(
        "INSERT INTO engagement.member_facts (member_id, nickname) VALUES ($1, $2)"
        " ON CONFLICT (member_id) DO UPDATE SET nickname = excluded.nickname,"
        " updated_at = now()",
        member_id,
        nickname,
    )


async def set_guide(conn: Connection, member_id: uuid.UUID, userid: str) -> None:
    """The member's exclusive guide's WeCom userid (guides' GuideBound)."""
    await conn.execute(
        "INSERT INTO engagement.member_facts (member_id, guide_userid) VALUES ($1, $2)"
        " ON CONFLICT (member_id) DO UPDATE SET guide_userid = excluded.guide_userid,"
        " updated_at = now()",
        member_id,
        userid,
    )


async def consents_of(conn: Connection, member_ids: list[uuid.UUID]) -> dict[str, dict[str, bool]]:
    """member -> channel -> marketing consent, as known now."""
    consents: dict[str, dict[str, bool]] = {}
    for r in await conn.fetch(
        "SELECT member_id, channel, granted FROM engagement.consents"
        " WHERE member_id = ANY($1::uuid[])",
        member_ids,
    ):
        consents.setdefault(str(r["member_id"]), {})[r["channel"]] = r["granted"]
    return consents


async def give_back_subscription_credit(
    conn: Connection, member_id: uuid.UUID, template: str, epoch: int | None
) -> None:
    """A credit spent by a send that never went (suppressed at delivery),
    unless WeChat has voided the credits since it was taken (a newer epoch)."""
    await conn.execute(
        "UPDATE engagement.subscription_credits SET credits = credits + 1"
        " WHERE member_id = $1 AND template = $2 AND epoch = coalesce($3::int, 0)",
        member_id,
        template,
        epoch,
    )


async def clear_subscription_credits(conn: Connection, member_id: uuid.UUID, template: str) -> None:
    """WeChat answered 43101 (no credit left for this template): the taps we
    counted were used or withdrawn on the member's side; WeChat's count wins,
    so later sends are suppressed here (NO_SUBSCRIPTION_CREDIT) until a new tap.
    The epoch moves on: credits pending sends took before now are void too."""
    await conn.execute(
        "UPDATE engagement.subscription_credits SET credits = 0, epoch = epoch + 1"
        " WHERE member_id = $1 AND template = $2",
        member_id,
        template,
    )


async def set_consent(
    conn: Connection,
    member_id: uuid.UUID,
    channels: list[str],
    granted: bool,
    source: str,
    at: datetime,
) -> None:
    await conn.executemany(
        "INSERT INTO engagement.consents (member_id, channel, granted, source, updated_at)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (member_id, channel) DO UPDATE SET"
        " granted = excluded.granted, source = excluded.source, updated_at = excluded.updated_at",
        [(member_id, c, granted, source, at) for c in channels],
    )


async def apply_consent(
    conn: Connection,
    member_id: uuid.UUID,
    channels: list[str],
    granted: bool,
    source: str,
    at: datetime,
) -> None:
    """A choice recorded elsewhere at `at`: last write wins, so an older one
    arriving late never overwrites a newer choice; at the same instant a
    refusal wins. Replaying the same choice changes nothing."""
    await conn.executemany(
        "INSERT INTO engagement.consents AS c (member_id, channel, granted, source, updated_at)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (member_id, channel) DO UPDATE SET"
        " granted = excluded.granted, source = excluded.source, updated_at = excluded.updated_at"
        " WHERE c.updated_at < excluded.updated_at"
        " OR (c.updated_at = excluded.updated_at AND NOT excluded.granted)",
        [(member_id, c, granted, source, at) for c in channels],
    )


async def apply_non_personalised(
    conn: Connection, member_id: uuid.UUID, value: bool, at: datetime
) -> None:
    """Last write wins by `at`, as apply_consent; at the same instant the
    refusal of personalisation wins."""
    await conn.execute(
        "INSERT INTO engagement.preferences AS p (member_id, non_personalised, updated_at)"
        " VALUES ($1, $2, $3) ON CONFLICT (member_id) DO UPDATE SET"
        " non_personalised = excluded.non_personalised, updated_at = excluded.updated_at"
        " WHERE p.updated_at < excluded.updated_at"
        " OR (p.updated_at = excluded.updated_at AND excluded.non_personalised)",
        member_id,
        value,
        at,
    )


async def set_non_personalised(
    conn: Connection, member_id: uuid.UUID, value: bool, at: datetime
) -> None:
    await conn.execute(
        "INSERT INTO engagement.preferences (member_id, non_personalised, updated_at)"
        " VALUES ($1, $2, $3) ON CONFLICT (member_id) DO UPDATE SET"
        " non_personalised = excluded.non_personalised, updated_at = excluded.updated_at",
        member_id,
        value,
        at,
    )


async def add_subscription_credit(conn: Connection, member_id: uuid.UUID, template: str) -> int:
    return int(
        await conn.fetchval(
            "INSERT INTO engagement.subscription_credits AS s (member_id, template, credits)"
            " VALUES ($1, $2, 1) ON CONFLICT (member_id, template)"
            " DO UPDATE SET credits = s.credits + 1 RETURNING credits",
            member_id,
            template,
        )
    )


async def take_subscription_credit(
    conn: Connection, member_id: uuid.UUID, template: str
) -> int | None:
    """Atomic: a credit is spent by at most one send. Returns the credits'
    epoch the send holds it in (kept on the send), None when there is none."""
    epoch = await conn.fetchval(
        "UPDATE engagement.subscription_credits SET credits = credits - 1"
        " WHERE member_id = $1 AND template = $2 AND credits > 0 RETURNING epoch",
        member_id,
        template,
    )
    return None if epoch is None else int(epoch)


async def credit_epochs(
    conn: Connection, keys: list[tuple[uuid.UUID, str]]
) -> dict[tuple[str, str], int]:
    """The current credit epoch of each (member, template) that has a row."""
    if not keys:
        return {}
    rows = await conn.fetch(
        "SELECT c.member_id, c.template, c.epoch FROM engagement.subscription_credits c"
        " JOIN unnest($1::uuid[], $2::text[]) AS k(m, t) ON c.member_id = k.m AND c.template = k.t",
        [k[0] for k in keys],
        [k[1] for k in keys],
    )
    return {(str(r["member_id"]), r["template"]): r["epoch"] for r in rows}


async def set_address(conn: Connection, member_id: uuid.UUID, channel: str, address: str) -> None:
    await conn.execute(
        "INSERT INTO engagement.channel_addresses (member_id, channel, address)"
        " VALUES ($1, $2, $3) ON CONFLICT (member_id, channel) DO UPDATE SET"
        " address = excluded.address",
        member_id,
        channel,
        address,
    )


async def addresses(conn: Connection, member_ids: list[uuid.UUID]) -> dict[tuple[str, str], str]:
    rows = await conn.fetch(
        "SELECT member_id, channel, address FROM engagement.channel_addresses"
        " WHERE member_id = ANY($1::uuid[])",
        member_ids,
    )
    return {(str(r["member_id"]), r["channel"]): r["address"] for r in rows}


async def set_birthday(conn: Connection, member_id: uuid.UUID, month: int, day: int) -> None:
    """Month and day only; month 0 forgets the birthday. Changing it keeps
    `entered_for`, so a member does not enter twice for the same month."""
    if month == 0:
        await conn.execute(
            "DELETE FROM engagement.member_birthdays WHERE member_id = $1", member_id
        )
        return
    await conn.execute(
        "INSERT INTO engagement.member_birthdays (member_id, month, day) VALUES ($1, $2, $3)"
        " ON CONFLICT (member_id) DO UPDATE SET month = excluded.month, day = excluded.day",
        member_id,
        month,
        day,
    )


async def claim_birthdays(
    conn: Connection, month: int, entered_for: int, limit: int
) -> list[tuple[uuid.UUID, int]]:
    """Members born in `month` not yet entered for it, marked entered (the
    caller enrolls them in the same transaction). Reads only the index range
    of the not-yet-entered: the daily difference, not a rescan."""
    rows = await conn.fetch(
        "UPDATE engagement.member_birthdays b SET entered_for = $2"
        " WHERE b.member_id IN (SELECT member_id FROM engagement.member_birthdays"
        "  WHERE month = $1 AND entered_for < $2 LIMIT $3 FOR UPDATE SKIP LOCKED)"
        " RETURNING b.member_id, b.day",
        month,
        entered_for,
        limit,
    )
    return [(r["member_id"], r["day"]) for r in rows]


async def set_location(
    conn: Connection, member_id: uuid.UUID, lat: float, lon: float, at: datetime
) -> None:
    await conn.execute(
        "INSERT INTO engagement.member_locations (member_id, latitude, longitude, reported_at)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT (member_id) DO UPDATE SET"
        " latitude = excluded.latitude, longitude = excluded.longitude,"
        " reported_at = excluded.reported_at",
        member_id,
        lat,
        lon,
        at,
    )


async def clear_location(conn: Connection, member_id: uuid.UUID) -> None:
    await conn.execute("DELETE FROM engagement.member_locations WHERE member_id = $1", member_id)


async def members_near(
    conn: Connection,
    box: tuple[float, float, float, float],
    lat: float,
    lon: float,
    radius_m: float,
    since: datetime,
) -> list[uuid.UUID]:
    """Members whose last-known location (reported since `since`) is within
    `radius_m`: the bounding box uses the index, the haversine decides."""
    rows = await conn.fetch(
        "SELECT member_id FROM engagement.member_locations"
        " WHERE latitude BETWEEN $1 AND $2 AND longitude BETWEEN $3 AND $4"
        " AND reported_at >= $8"
        " AND 2 * 6371000 * asin(sqrt(power(sin(radians(latitude - $5) / 2), 2)"
        "  + cos(radians($5)) * cos(radians(latitude))"
        "  * power(sin(radians(longitude - $6) / 2), 2))) <= $7"
        " ORDER BY member_id",
        *box,
        lat,
        lon,
        radius_m,
        since,
    )
    return [r["member_id"] for r in rows]


async def replace_tags(conn: Connection, member_id: uuid.UUID, tags: list[str]) -> None:
    """The member's tags as the guides service (their owner) published them."""
    await conn.execute(
        "DELETE FROM engagement.member_tags WHERE member_id = $1 AND NOT (tag = ANY($2::text[]))",
        member_id,
        tags,
    )
    await add_tags(conn, [(member_id, t) for t in tags])


async def add_tags(conn: Connection, pairs: list[tuple[uuid.UUID, str]]) -> None:
    if pairs:
        await conn.execute(
            "INSERT INTO engagement.member_tags (member_id, tag)"
            " SELECT * FROM unnest($1::uuid[], $2::text[]) ON CONFLICT DO NOTHING",
            [p[0] for p in pairs],
            [p[1] for p in pairs],
        )


async def park_event(
    conn: Connection,
    member_id: uuid.UUID,
    event: str,
    attributes: dict[str, str],
    occurred_at: datetime,
    reason: str,
    parked_at: datetime,
) -> None:
    await conn.execute(
        "INSERT INTO engagement.parked_events"
        " (member_id, event, attributes, occurred_at, reason, parked_at)"
        " VALUES ($1, $2, $3::jsonb, $4, $5, $6)",
        member_id,
        event,
        json.dumps(attributes),
        occurred_at,
        reason,
        parked_at,
    )


async def take_parked(
    conn: Connection, member_id: uuid.UUID
) -> list[tuple[str, dict[str, str], datetime]]:
    rows = await conn.fetch(
        "DELETE FROM engagement.parked_events WHERE member_id = $1"
        " RETURNING event, attributes::text AS attributes, occurred_at, id",
        member_id,
    )
    return _parked_in_order(rows)


async def introduce(
    conn: Connection, member_id: uuid.UUID
) -> list[tuple[str, dict[str, str], datetime]]:
    """ensure_member and take_parked in one statement (one round trip; every
    consumed order introduces its member)."""
    rows = await conn.fetch(
        "WITH known AS (INSERT INTO engagement.member_facts (member_id) VALUES ($1)"
        " ON CONFLICT DO NOTHING)"
        " DELETE FROM engagement.parked_events WHERE member_id = $1"
        " RETURNING event, attributes::text AS attributes, occurred_at, id",
        member_id,
    )
    return _parked_in_order(rows)


def _parked_in_order(rows: list[Any]) -> list[tuple[str, dict[str, str], datetime]]:
    rows = sorted(rows, key=lambda r: r["id"])
    return [(r["event"], json.loads(r["attributes"]), r["occurred_at"]) for r in rows]


@dataclass(frozen=True)
class ParkedRow:
    id: int
    member_id: uuid.UUID
    event: str
    attributes: dict[str, str]
    occurred_at: datetime
    reason: str
    parked_at: datetime


async def list_parked(
    conn: Connection, member_id: uuid.UUID | None, after_id: int, limit: int
) -> list[ParkedRow]:
    """Parked events oldest first (by id), after `after_id`: a keyset page."""
    rows = await conn.fetch(
        "SELECT id, member_id, event, attributes::text AS attributes, occurred_at, reason,"
        " parked_at FROM engagement.parked_events"
        " WHERE id > $1 AND ($2::uuid IS NULL OR member_id = $2) ORDER BY id LIMIT $3",
        after_id,
        member_id,
        limit,
    )
    return [
        ParkedRow(
            r["id"],
            r["member_id"],
            r["event"],
            json.loads(r["attributes"]),
            r["occurred_at"],
            r["reason"],
            r["parked_at"],
        )
        for r in rows
    ]


async def expire_parked(conn: Connection, parked_before: datetime, limit: int) -> int:
    """Delete up to `limit` events parked before `parked_before` (the index on
    parked_at reads only those); returns how many."""
    return int(
        await conn.fetchval(
            "WITH gone AS (DELETE FROM engagement.parked_events WHERE id IN"
            " (SELECT id FROM engagement.parked_events WHERE parked_at < $1"
            "  ORDER BY parked_at LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING 1)"
            " SELECT count(*) FROM gone",
            parked_before,
            limit,
        )
    )
