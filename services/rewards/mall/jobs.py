"""Scheduled job of the points mall: release points-plus-cash exchanges whose
payment did not arrive by their deadline (points, stock and count back), each
in its own short transaction under the exchange's row lock, so a confirmation
racing the job either wins or is told PAYMENT_TIMED_OUT."""

from __future__ import annotations

from datetime import datetime

from servicekit.db import Database

from . import repository as repo
from .handlers import PointsMall

BATCH = 500


async def release_unpaid(db: Database, mall: PointsMall, now: datetime) -> int:
    """Release what is due; how many exchanges were released."""
    released = 0
    while True:
        async with db.unit_of_work() as uow:
            due = await repo.due_unpaid(uow.conn, now, BATCH)
        for exchange_id in due:
            async with db.unit_of_work() as uow:
                released += await mall.release_unpaid(uow, exchange_id, now)
        if len(due) < BATCH:
            return released
