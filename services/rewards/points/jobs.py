"""Scheduled jobs of the points ledger: expiry, expiring-soon announcements,
hold time-outs. Each member (or hold) is handled in its own short transaction
under the member's lock, so a job never blocks checkout for long and two job
runs (or a job and a redemption) never apply the same change twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime

from servicekit.db import Connection, Database, UnitOfWork

from . import repository as ledger
from .handlers import PointsLedger

BATCH = 500


async def _one_by_one(
    db: Database,
    due: Callable[[Connection], Awaitable[list[uuid.UUID]]],
    handle: Callable[[UnitOfWork, uuid.UUID], Awaitable[object]],
) -> int:
    """Read a batch of what is due, handle each in its own transaction, until
    a batch comes back short; how many were handled."""
    done = 0
    while True:
        async with db.unit_of_work() as uow:
            batch = await due(uow.conn)
        for item in batch:
            async with db.unit_of_work() as uow:
                await handle(uow, item)
        done += len(batch)
        if len(batch) < BATCH:
            return done


async def expire_due(db: Database, points: PointsLedger, now: datetime) -> int:
    """Expire and activate what is due, member by member; the number of
    members. Then the lots' expiry floor is raised (the spend's lot read
    prunes the lots' partitions before it)."""
    done = await _one_by_one(
        db,
        lambda conn: ledger.members_with_due_lots(conn, now, BATCH),
        lambda uow, member: points.expire_member(uow, member, now),
    )
    async with db.unit_of_work() as uow:
        await ledger.raise_expiry_floor(uow.conn, now)
    return done


async def announce_expiring(db: Database, points: PointsLedger, now: datetime) -> int:
    total = 0
    while True:
        async with db.unit_of_work() as uow:
            n = await points.announce_expiring(uow, now, BATCH)
        total += n
        if n == 0:
            return total


async def void_timed_out_holds(db: Database, points: PointsLedger, now: datetime) -> int:
    return await _one_by_one(
        db,
        lambda conn: ledger.timed_out_holds(conn, now, BATCH),
        lambda uow, hold_id: points.void_hold(uow, str(hold_id), now, timed_out=True),
    )
