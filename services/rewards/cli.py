"""The operator commands of `python -m services.rewards` (audit, expiry,
announcements, hold time-outs, unpaid mall exchanges): which job each name
runs, against DATABASE_URL."""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict
from datetime import UTC, datetime

from servicekit.db import Database, create_pool
from servicekit.settings import ServiceSettings

from .coupons.jobs import announce_expiring_coupons, expire_coupons
from .mall.jobs import release_unpaid
from .points.audit import audit_ledger
from .points.earning import parse_rules
from .points.handlers import PointsLedger
from .points.jobs import announce_expiring, expire_due, void_timed_out_holds
from .server import RewardsSettings


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
        if command == "release-unpaid-mall-exchanges":
            print(f"{command}: {await release_unpaid(db, rewards.points_mall(points), now)}")
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
