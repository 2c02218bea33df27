"""ServiceMetrics.sample under cancellation: a stopping service cancels its
sampler mid-sample, which must leave no coroutine behind un-awaited (the
"coroutine 'ServiceMetrics._sample_probe' was never awaited" RuntimeWarning
the suite printed, later, in whichever test collected the garbage)."""

from __future__ import annotations

import asyncio
import gc
import warnings
from typing import Any

from servicekit.metrics import ServiceMetrics


class _BlockingPool:
    """An asyncpg pool stand-in whose outbox query never answers."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()

    def get_size(self) -> int:
        return 1

    def get_idle_size(self) -> int:
        return 1

    def get_max_size(self) -> int:
        return 4

    async def fetchrow(self, *_: Any) -> None:
        self.asked.set()
        await asyncio.Event().wait()


class _Db:
    def __init__(self) -> None:
        self.pool = _BlockingPool()
        self.schema = "s"


async def test_a_sample_cancelled_midway_leaves_no_unawaited_coroutine() -> None:
    metrics = ServiceMetrics("sampled")
    probed: list[str] = []

    async def probe() -> float:
        probed.append("read")
        return 1.0

    metrics.add_probe("sampled_probe", "a probe", probe)
    db = _Db()
    task = asyncio.create_task(metrics.sample(db, None, "ns", []))  # type: ignore[arg-type]
    await db.pool.asked.wait()
    task.cancel()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            await task
        except asyncio.CancelledError:
            pass
        del task
        # The cancelled frame (and what it held) is released on a later turn of the loop.
        for _ in range(5):
            await asyncio.sleep(0)
        gc.collect()
    never_awaited = [w for w in caught if "was never awaited" in str(w.message)]
    assert never_awaited == []
    assert probed == []
