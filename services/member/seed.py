"""Demo members for `make run` (servicekit/demo.py): the people registered
over the last 90 days, each with the store and channel that acquired them (as
profile observations, the way a POS or the mini-program reports them). One
statement; members already there are left as they are (idempotent). The
registrations are history, so no MemberRegistered is emitted: the other
services' seeds take the same people from servicekit/demo.py."""

from __future__ import annotations

import asyncpg

from servicekit.demo import DemoMember

# Member numbers of demo members: above the sequence's (10,000,001 up) range
# for years of real registrations.
DEMO_NUMBER_BASE = 90_000_000


async def seed_demo_members(conn: asyncpg.Connection, members: list[DemoMember]) -> int:
    """Insert the demo members not there yet; how many were inserted."""
    return int(
        await conn.fetchval(
            "WITH src AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::timestamptz[],"
            " $4::text[], $5::text[]) AS s(id, number, registered_at, channel, store_id)),"
            " added AS (INSERT INTO member.members (id, member_number, registered_at,"
            " registration_source) SELECT id, number, registered_at, channel FROM src"
            " ON CONFLICT (id) DO NOTHING RETURNING id, registered_at),"
            " observed AS (INSERT INTO member.profile_observations (member_id, field, value,"
            " source, verified, observed_at)"
            " SELECT a.id, f.field, f.value, 'demo-seed', false, a.registered_at"
            " FROM added a JOIN src ON src.id = a.id"
            " CROSS JOIN LATERAL (VALUES ('registration_store_id', src.store_id),"
            " ('acquisition_channel', src.channel)) AS f(field, value) RETURNING 1)"
            " SELECT count(*) FROM added",
            [m.member_id for m in members],
            [str(DEMO_NUMBER_BASE + m.number) for m in members],
            [m.registered_at for m in members],
            [m.channel for m in members],
            [m.store_id for m in members],
        )
    )
