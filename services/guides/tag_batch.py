"""The rule-tag batch run by one replica at a time (issue 20 audit): every
replica's timer used to run it from its own start, all at once and repeated.

- A session advisory lock on one pooled connection: a second runner (another
  replica, the CronJob beside a replica) finds it held and skips.
- The service's timer (TAG_REFRESH_HOURS > 0) also skips while the last run,
  by any replica or the CronJob, is more recent than its cadence
  (`guides.job_runs`), so N replicas run it once per period, not N times.
- TAG_REFRESH_HOURS=0 turns the timer off: the nightly `guides-tag-batch`
  CronJob (`python -m services.guides tag-batch`) runs it instead.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from servicekit.db import Database, session_state_changed
from servicekit.errors import FailedPrecondition

if TYPE_CHECKING:
    from .tag_handlers import TagBatchResult, TagHandlers

JOB = "tag-batch"
LOCK_NAME = "guides:tag-batch"


class TagBatchBusy(FailedPrecondition):
    default_code = "TAG_BATCH_BUSY"


async def run_alone(
    h: TagHandlers, db: Database, window_days: int = 0, every: timedelta | None = None
) -> TagBatchResult | None:
    """The batch under the lock; None when another runner holds it, or (with
    `every`) when the last run finished less than `every` ago."""
    async with db.pool.acquire() as conn:
        session_state_changed(conn)
        if not await conn.fetchval(
            "SELECT pg_try_advisory_lock(hashtextextended($1, 0))", LOCK_NAME
        ):
            return None
        try:
            now = h.clock()
            if every is not None:
                last = await conn.fetchval(
                    "SELECT last_run_at FROM guides.job_runs WHERE job = $1", JOB
                )
                if last is not None and now - last < every:
                    return None
            result = await h.run_tag_batch(db, window_days)
            await conn.execute(
                "INSERT INTO guides.job_runs (job, last_run_at) VALUES ($1, $2)"
                " ON CONFLICT (job) DO UPDATE SET last_run_at = EXCLUDED.last_run_at",
                JOB,
                now,
            )
            return result
        finally:
            await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", LOCK_NAME)


async def run_or_refuse(h: TagHandlers, db: Database, window_days: int = 0) -> TagBatchResult:
    """For an operator or the CronJob: the batch, or TAG_BATCH_BUSY."""
    result = await run_alone(h, db, window_days)
    if result is None:
        raise TagBatchBusy(
            "another rule-tag batch is running (a replica or the CronJob); try later"
        )
    return result
