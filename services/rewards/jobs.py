"""Batch jobs of the ledger: expiry, expiring-soon announcements, hold
time-outs, and the audit. Each member (or hold) is handled in its own short
transaction under the member's lock, so a job never blocks checkout for long
and two job runs (or a job and a redemption) never apply the same change twice.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime

from servicekit.db import Connection, Database, UnitOfWork, create_pool
from servicekit.settings import ServiceSettings

from . import coupon_service, ledger
from .audit import audit_ledger
from .coupon_service import CouponPolicy
from .earning import parse_rules
from .points import PointsLedger
from .server import RewardsSettings

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
    """Expire and activate what is due, member by member; the number of members."""
    return await _one_by_one(
        db,
        lambda conn: ledger.members_with_due_lots(conn, now, BATCH),
        lambda uow, member: points.expire_member(uow, member, now),
    )


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


async def expire_coupons(db: Database, now: datetime) -> int:
    """Mark lapsed coupons expired, a batch per transaction (reads and uses
    already treat them as expired; this keeps the wallet and reports tidy)."""
    total = 0
    while True:
        async with db.unit_of_work() as uow:
            n = await coupon_service.expire_batch(uow.conn, now, BATCH)
        total += n
        if n < BATCH:
            return total


async def announce_expiring_coupons(db: Database, policy: CouponPolicy, now: datetime) -> int:
    total = 0
    while True:
        async with db.unit_of_work() as uow:
            n = await coupon_service.announce_expiring(uow.conn, now, policy, BATCH)
        if n:
            db.outbox_wakeup.set()
        total += n
        if n < BATCH:
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
        if command == "expire-coupons":
            print(f"{command}: {await expire_coupons(db, now)}")
            return 0
        if command == "announce-expiring-coupons":
            n = await announce_expiring_coupons(db, rewards.coupon_policy(), now)
            print(f"{command}: {n}")
            return 0
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
