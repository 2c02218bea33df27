"""Scheduled jobs of the coupons: expire lapsed coupons, announce coupons
lapsing soon. A batch per transaction; a second run finds nothing left to do."""

from __future__ import annotations

from datetime import datetime

from servicekit.db import Database

from . import handlers as coupon_service
from .handlers import CouponPolicy

BATCH = 500


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
