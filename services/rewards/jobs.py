"""Batch jobs of the ledger: expiry, expiring-soon announcements, hold
time-outs, and the audit. Each member (or hold) is handled in its own short
transaction under the member's lock, so a job never blocks checkout for long
and two job runs (or a job and a redemption) never apply the same change twice.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict
from datetime import UTC, datetime

from servicekit.db import Database, create_pool
from servicekit.settings import ServiceSettings

from . import ledger
from .audit import audit_ledger
from .earning import parse_rules
from .points import PointsLedger
from .server import RewardsSettings

BATCH = 500


async def expire_due(db: Database, points: PointsLedger, now: datetime) -> int:
    """Expire and activate what is due, member by member; the number of members."""
    done = 0
    while True:
        async with db.unit_of_work() as uow:
            members = await ledger.members_with_due_lots(uow.conn, now, BATCH)
        for member in members:
            async with db.unit_of_work() as uow:
                await points.expire_member(uow, member, now)
        done += len(members)
        if len(members) < BATCH:
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
    total = 0
    while True:
        async with db.unit_of_work() as uow:
            holds = await ledger.timed_out_holds(uow.conn, now, BATCH)
        for hold_id in holds:
            async with db.unit_of_work() as uow:
                await points.void_hold(uow, str(hold_id), now, timed_out=True)
        total += len(holds)
        if len(holds) < BATCH:
            return total


async def _run(command: str) -> int:
    settings = ServiceSettings()
    rewards = RewardsSettings()
    points = PointsLedger(rewards.ledger_policy(), parse_rules(rewards.earning_rules))
    pool = await create_pool(settings.database_url, 1, 4)
    db = Database(pool, "rewards", "rewards")
    now = datetime.now(UTC)
    try:
        if command == "audit":
            async with pool.acquire() as conn:
                report = await audit_ledger(conn)
            print(json.dumps(asdict(report) | {"ok": report.ok}, indent=2))
            return 0 if report.ok else 1
        jobs = {
            "expire": expire_due,
            "announce-expiring": announce_expiring,
            "void-timed-out-holds": void_timed_out_holds,
        }
        n = await jobs[command](db, points, now)
        print(f"{command}: {n}")
        return 0
    finally:
        await db.close()


def run_job(command: str, argv: list[str]) -> int:
    argparse.ArgumentParser(prog=f"python -m services.rewards {command}").parse_args(argv)
    return asyncio.run(_run(command))
